"""Property-based tests of the served API against its own OpenAPI document (schemathesis).

Every operation, generated valid and invalid inputs, a bounded number of examples: no 5xx,
no undocumented status, content type or response shape, invalid input refused, undeclared
methods answered 405 with `Allow`. Not checked: `positive_data_acceptance`, because some
schema-valid requests are refused on purpose by rules that depend on stored state (a shrinking
expand, a page token we never issued, a mutual CHAP secret equal to the secret).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.meta.conftest import TOKENS, MetaProcess


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_spec_violation(
    meta_process: MetaProcess, tmp_path: Path
) -> None:
    import sys

    st = Path(sys.executable).parent / "schemathesis"
    proc = subprocess.run(
        [
            str(st),
            "run",
            f"{meta_process.url}/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {TOKENS['admin']}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance,negative_data_rejection,unsupported_method,"
            "missing_required_header",
            "--max-examples",
            "25",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "7",
            "--workers",
            "2",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
