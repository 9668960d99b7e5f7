"""pytest entry of the lio-export scenario (tests/kernel/lio.py): one guest boot, ~2-3 min."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel.harness import boot_files, unavailable
from tests.kernel.lio import run_lio

reason = unavailable()


@pytest.mark.skipif(reason is not None, reason=reason or "")
def test_lio_export(tmp_path: Path) -> None:
    boot = boot_files(Path("build/kernel-guest"))
    result = run_lio(boot, tmp_path / "lio-export", bench_seconds=0)
    print(result.line())
    assert result.passed, "\n".join(result.problems)
