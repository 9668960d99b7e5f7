"""One compose cluster for the whole run (images built from nothing where they are absent),
torn down with its volumes whatever happens; one summary line per scenario with its timings."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compose.cluster import ComposeCluster, docker_available

LINES: list[str] = []
LOG_DIR = Path(os.environ.get("LUNASTOR_COMPOSE_LOGS", "build/compose-test"))


class Report:
    """What a scenario prints in the summary: `compose <name>: <seconds> s: <detail>`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.monotonic()

    def line(self, detail: str) -> None:
        took = time.monotonic() - self.started
        LINES.append(f"compose {self.name}: {took:.1f} s: {detail}")


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    name = request.node.name.removeprefix("test_")
    return Report(name)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ComposeCluster]:
    reason = docker_available()
    if reason is not None:
        pytest.skip(reason)
    c = ComposeCluster(f"lunastor-test-{os.getpid()}")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    try:
        c.down()  # a project of the same name left by a killed run
        c.build()
        c.up()
        LINES.append(
            "compose images: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in c.timings.items())
            + f" (network {c.net}.0/24, API 127.0.0.1:{c.api_port}, {' '.join(c.compose)})"
        )
        yield c
    finally:
        try:
            c.logs(LOG_DIR / "compose.log")
        finally:
            c.down()
            left = c.volumes()
            LINES.append(f"compose down -v: volumes left: {left or 'none'}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LINES:
        terminalreporter.section("compose scenarios")
        for line in LINES:
            terminalreporter.write_line(line)
