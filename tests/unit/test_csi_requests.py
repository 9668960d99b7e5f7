"""The CSI plugin's pure parts: request checks, the REST-problem -> gRPC table, mountinfo
parsing, and that the committed protobuf gencode is what csi.proto generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from lunastor.csi import csi_pb2 as pb
from lunastor.csi.controller import condition_message
from lunastor.csi.errors import BY_CODE, CsiError, status_for
from lunastor.csi.mounts import parse_mountinfo
from lunastor.csi.requests import (
    ZONE_KEY,
    api_name,
    capability_problem,
    choose_zones,
    mutable_parameters,
    size_for,
    volume_parameters,
)

S = grpc.StatusCode
Mode = pb.VolumeCapability.AccessMode.Mode
MiB = 1 << 20
GiB = 1 << 30
CSI_DIR = Path(__file__).resolve().parents[2] / "lunastor" / "csi"


def cr(required: int = 0, limit: int = 0) -> pb.CapacityRange:
    return pb.CapacityRange(required_bytes=required, limit_bytes=limit)


@pytest.mark.parametrize(
    ("capacity", "block", "minimum", "expected"),
    [
        (None, 512, 0, GiB),  # nothing asked: 1 GiB
        (cr(limit=MiB), 512, 0, MiB),  # only a limit below the default: the limit
        (cr(1), 512, 0, 512),
        (cr(10 * MiB + 1), 4096, 0, 10 * MiB + 4096),
        (cr(MiB, MiB), 512, 0, MiB),
        (cr(MiB), 512, 32 * MiB, 32 * MiB),  # a clone is at least its source
    ],
)
def test_size_for(
    capacity: pb.CapacityRange | None, block: int, minimum: int, expected: int
) -> None:
    assert size_for(capacity, block, minimum) == expected


@pytest.mark.parametrize(
    ("capacity", "block", "minimum", "code"),
    [
        (cr(2 * GiB, GiB), 512, 0, S.OUT_OF_RANGE),
        (cr(1000, 1000), 512, 0, S.OUT_OF_RANGE),  # rounded up past the limit
        (cr(1 << 51), 512, 0, S.OUT_OF_RANGE),
        (cr(-1), 512, 0, S.INVALID_ARGUMENT),
        (cr(0, -1), 512, 0, S.INVALID_ARGUMENT),
        (cr(MiB, 2 * MiB), 512, 32 * MiB, S.OUT_OF_RANGE),  # the source is bigger than the limit
    ],
)
def test_size_for_refuses(
    capacity: pb.CapacityRange, block: int, minimum: int, code: grpc.StatusCode
) -> None:
    with pytest.raises(CsiError) as info:
        size_for(capacity, block, minimum)
    assert info.value.code == code


def test_parameters() -> None:
    assert volume_parameters({}) == volume_parameters({"csi.storage.k8s.io/pvc/name": "x"})
    p = volume_parameters({"replicas": "2", "blockSize": "4096", "fsType": "xfs"})
    assert (p.replicas, p.block_size, p.fs_type) == (2, 4096, "xfs")
    for bad in (
        {"replicas": "0"},
        {"replicas": "two"},
        {"blockSize": "1024"},
        {"fsType": "zfs"},
        {"x": "1"},
    ):
        with pytest.raises(CsiError) as info:
            volume_parameters(bad)
        assert info.value.code == S.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("params", "qos"),
    [
        ({"writeIops": "500"}, {"write_iops": 500}),
        ({"bps": "100Mi", "bpsBurst": "1GiB", "burstSeconds": "2.5"},
         {"bps": 100 * MiB, "bps_burst": GiB, "burst_seconds": 2.5}),
        ({"readIops": "0"}, {}),  # 0: no limit
    ],
)  # fmt: skip
def test_qos_parameters(params: dict[str, str], qos: dict[str, float]) -> None:
    assert volume_parameters({**params, "replicas": "2"}).qos == qos
    # in a VolumeAttributesClass the same keys; "0" is kept there: it clears a limit
    assert {k: v for k, v in mutable_parameters(params).items() if v} == qos


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"writeIops": "fast"}, "writeIops"),
        ({"writeIops": "-5"}, "writeIops"),
        ({"bps": "1 lot"}, "bps"),
        ({"burstSeconds": "nan", "iops": "5", "iopsBurst": "10"}, "burstSeconds"),
        ({"iopsBurst": "10"}, "iopsBurst"),  # a burst needs its rate
        ({"iops": "10", "iopsBurst": "5"}, "iopsBurst"),
    ],
)
def test_qos_parameters_refused(params: dict[str, str], names: str) -> None:
    for parse in (volume_parameters, mutable_parameters):
        with pytest.raises(CsiError) as info:
            parse(params)
        assert info.value.code == S.INVALID_ARGUMENT and names in str(info.value)
    with pytest.raises(CsiError) as info:  # only QoS limits are mutable
        mutable_parameters({"replicas": "2"})
    assert "replicas" in str(info.value)


def test_names() -> None:
    assert api_name("pvc-1234") == "pvc-1234"
    hashed = api_name("my volume/ü")
    assert hashed.startswith("csi-") and hashed == api_name("my volume/ü") != api_name("my volume")
    for bad in ("", "x" * 129, "a\x00b", "a\x9fb"):
        with pytest.raises(CsiError):
            api_name(bad)


def cap(kind: str, mode: int, fs: str = "") -> pb.VolumeCapability:
    c = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=mode))  # type: ignore[arg-type]
    if kind == "block":
        c.block.SetInParent()
    elif kind == "mount":
        c.mount.fs_type = fs
    return c


@pytest.mark.parametrize(
    ("capability", "ok"),
    [
        (cap("mount", Mode.SINGLE_NODE_WRITER), True),
        (cap("mount", Mode.SINGLE_NODE_WRITER, "xfs"), True),
        (cap("mount", Mode.MULTI_NODE_READER_ONLY), True),
        (cap("block", Mode.MULTI_NODE_MULTI_WRITER), True),
        (cap("mount", Mode.MULTI_NODE_MULTI_WRITER), False),
        (cap("mount", Mode.MULTI_NODE_SINGLE_WRITER), False),
        (cap("mount", Mode.SINGLE_NODE_WRITER, "vfat"), False),
        (cap("none", Mode.SINGLE_NODE_WRITER), False),
        (cap("mount", Mode.UNKNOWN), False),
    ],
)
def test_capabilities(capability: pb.VolumeCapability, ok: bool) -> None:
    assert (capability_problem(capability) is None) == ok


def topo(*zones: str) -> list[pb.Topology]:
    return [pb.Topology(segments={ZONE_KEY: z}) for z in zones]


SERVERS = {"a": 1, "b": 2, "c": 1, "empty": 0}


@pytest.mark.parametrize(
    ("requisite", "preferred", "replicas", "expected"),
    [
        ((), (), 3, []),  # no requirement: anywhere
        (("a", "b"), ("b",), 1, ["b"]),
        (("a", "b"), ("b",), 3, ["b", "a"]),
        (("a", "b", "c"), ("c", "a"), 2, ["c", "a"]),
        ((), ("c",), 1, ["c"]),  # preferred only
        (("empty", "a"), ("empty",), 1, ["a"]),  # a zone without servers is skipped
        (("a", "b"), ("c",), 1, ["a"]),  # preferred outside requisite is ignored
    ],
)
def test_choose_zones(
    requisite: tuple[str, ...], preferred: tuple[str, ...], replicas: int, expected: list[str]
) -> None:
    req = pb.TopologyRequirement(requisite=topo(*requisite), preferred=topo(*preferred))
    assert choose_zones(req, SERVERS, replicas) == expected


@pytest.mark.parametrize(
    ("requisite", "replicas", "code"),
    [
        (("mars",), 1, S.RESOURCE_EXHAUSTED),
        (("a",), 2, S.RESOURCE_EXHAUSTED),  # one server cannot hold two copies
    ],
)
def test_choose_zones_refuses(
    requisite: tuple[str, ...], replicas: int, code: grpc.StatusCode
) -> None:
    with pytest.raises(CsiError) as info:
        choose_zones(pb.TopologyRequirement(requisite=topo(*requisite)), SERVERS, replicas)
    assert info.value.code == code
    bad = pb.TopologyRequirement(requisite=[pb.Topology(segments={"region": "x"})])
    with pytest.raises(CsiError) as info:
        choose_zones(bad, SERVERS, 1)
    assert info.value.code == S.INVALID_ARGUMENT


def test_every_documented_problem_code_has_a_status() -> None:
    """docs/csi-mapping.md's error table, code by code, and the field-dependent cases."""
    mapping = (Path(__file__).resolve().parents[2] / "docs" / "csi-mapping.md").read_text()
    for code in BY_CODE:
        assert f"`{code}`" in mapping, code
    assert status_for(400, "invalid_field", "next") == S.ABORTED
    assert status_for(400, "invalid_field", "size_bytes") == S.OUT_OF_RANGE
    assert status_for(400, "invalid_field", "name") == S.INVALID_ARGUMENT
    assert status_for(409, "volume_in_use") == S.FAILED_PRECONDITION
    assert status_for(409, "already_exists_with_different_parameters") == S.ALREADY_EXISTS
    assert status_for(409, "aborted") == S.ABORTED
    assert status_for(410, "token_expired") == S.ABORTED
    assert status_for(507, "luns_exhausted") == S.RESOURCE_EXHAUSTED
    assert status_for(503, "something_new") == S.UNAVAILABLE
    assert status_for(418, "teapot") == S.UNKNOWN


def test_mountinfo() -> None:
    text = (
        "36 35 8:16 / /var/lib/kubelet/staging\\040dir rw,relatime shared:1 - ext4 /dev/sdb "
        "rw,errors=remount-ro\n"
        "37 36 0:5 /sdc /stage/device rw,nosuid - devtmpfs udev rw,size=1k\n"
        "garbage line\n"
    )
    a, b = parse_mountinfo(text)
    assert (os.major(a.devno), os.minor(a.devno)) == (8, 16)
    assert a.point == "/var/lib/kubelet/staging dir" and a.fs_type == "ext4"
    assert "rw" in a.options and "errors=remount-ro" in a.super_options
    assert b.root == "/sdc" and b.fs_type == "devtmpfs"


def test_the_committed_gencode_is_what_the_proto_generates(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{CSI_DIR / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "csi.proto",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for name in ("csi_pb2.py", "csi_pb2.pyi"):
        assert (tmp_path / name).read_text() == (CSI_DIR / name).read_text(), (
            f"{name} is stale: run `make csi-proto`"
        )


def test_node_stage_secrets_become_chap_settings() -> None:
    from lunastor.csi.node import _chap

    assert _chap({}) == {}
    assert _chap({"username": "u", "password": "p" * 12}) == {
        "node.session.auth.username": "u",
        "node.session.auth.password": "p" * 12,
    }
    mutual = _chap({"username": "u", "password": "p", "mutualUsername": "t", "mutualPassword": "q"})
    assert mutual["node.session.auth.username_in"] == "t"
    assert mutual["node.session.auth.password_in"] == "q"
    for bad in ({"username": "u"}, {"user": "u", "password": "p"}):
        with pytest.raises(CsiError) as info:
            _chap(bad)
        assert info.value.code == S.INVALID_ARGUMENT


def test_volume_condition_is_abnormal_on_health_or_unrepaired_scrub_errors() -> None:
    ok = {"health": "ok", "health_detail": "all 2 extents fully replicated", "scrub_errors": 0}
    assert condition_message(ok) == pb.VolumeCondition(
        abnormal=False, message="ok: all 2 extents fully replicated"
    )
    bad = condition_message({**ok, "scrub_errors": 3})
    assert bad.abnormal and bad.message.startswith("ok: all 2 extents fully replicated; scrub: 3")
    degraded = condition_message({**ok, "health": "degraded", "health_detail": "1 of 2 ..."})
    assert degraded.abnormal and degraded.message == "degraded: 1 of 2 ..."
