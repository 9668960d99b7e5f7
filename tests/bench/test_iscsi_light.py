"""bench/iscsi_light.c, the light load client of the workers line, against the real target
(`lunastor-chunk standalone` on a file): it logs in as the initiator it is given, its writes
land where and as they should, its reads complete, and a LUN it may not see fails the run."""

from __future__ import annotations

import collections
import subprocess
from pathlib import Path

import pytest

from bench import iscsi_load
from bench.systems.standalone import serve
from tests.support.procs import free_port

SIZE = 8 << 20
BLOCK = 4096
DEPTH = 32
# the client's write buffers: slot i holds bytes 0xa5 ^ i
PATTERNS = {bytes([0xA5 ^ i]) * BLOCK for i in range(DEPTH)}


@pytest.fixture
def client(tmp_path: Path) -> Path:
    return iscsi_load.build(tmp_path / "bin", iscsi_load.LIGHT)


def test_the_light_client_writes_and_reads_through_a_real_session(
    client: Path, tmp_path: Path
) -> None:
    image = tmp_path / "lun.img"
    image.write_bytes(bytes(SIZE))
    host = "127.0.0.1"
    with serve(image, host, free_port(host), tmp_path / "target.log") as target:
        url = f"iscsi://{target.portal}/{target.iqn}/{target.lun}"
        writes = iscsi_load.Load(write=True, random=True, block=BLOCK, depth=DEPTH)
        argv = writes.argv(client, url, 1.0, SIZE, "iqn.2026-11.io.lunastor:light-test")
        wrote = iscsi_load.parse_load_output(_run(argv))
        reads = iscsi_load.Load(write=False, random=True, block=BLOCK, depth=DEPTH)
        read = iscsi_load.parse_load_output(_run(reads.argv(client, url, 1.0, SIZE)))
        seq = iscsi_load.Load(write=False, random=False, block=64 << 10, depth=4)
        sequential = iscsi_load.parse_load_output(_run(seq.argv(client, url, 0.5, SIZE)))
    assert wrote.ios > DEPTH and wrote.errors == 0
    assert read.ios > DEPTH and read.errors == 0
    assert sequential.ios > 4 and sequential.errors == 0
    data = image.read_bytes()
    blocks = collections.Counter(data[i : i + BLOCK] for i in range(0, SIZE, BLOCK))
    written = sum(n for block, n in blocks.items() if block in PATTERNS)
    # every block is either untouched or one whole write buffer (aligned, complete, in place)
    assert written + blocks[bytes(BLOCK)] == SIZE // BLOCK
    assert written > DEPTH


def test_the_light_client_fails_on_a_target_it_cannot_log_in_to(
    client: Path, tmp_path: Path
) -> None:
    image = tmp_path / "lun.img"
    image.write_bytes(bytes(SIZE))
    host = "127.0.0.1"
    with serve(image, host, free_port(host), tmp_path / "target.log") as target:
        url = f"iscsi://{target.portal}/iqn.2026-11.io.lunastor:no-such-target/1"
        load = iscsi_load.Load(write=False, random=True, block=BLOCK, depth=DEPTH)
        with pytest.raises(RuntimeError, match="login refused"):
            iscsi_load.run(client, url, load, 0.5, SIZE)


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
