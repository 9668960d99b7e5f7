"""Daemon logging: module loggers made at import follow the configuration made later."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_a_module_logger_bound_at_import_follows_the_daemons_level_and_format() -> None:
    # A fresh interpreter: structlog's configuration is process-global.
    script = textwrap.dedent(
        """
        from lunastor.meta import planners  # binds its module logger at import
        from lunastor.common.config import LogSettings
        from lunastor.common.logs import setup_logging

        setup_logging(LogSettings(level="warning", format="json"), "meta")
        planners.log.info("hidden at warning")
        planners.log.warning("shown", extent=3)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stderr
    assert lines[0]["event"] == "shown" and lines[0]["level"] == "warning"
    assert lines[0]["component"] == "planner" and lines[0]["daemon"] == "meta"
    assert lines[0]["extent"] == 3
