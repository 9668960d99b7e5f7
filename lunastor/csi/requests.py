"""Pure checks and conversions of CSI request fields: names, capacity ranges, StorageClass
parameters, volume capabilities and topology. Each raises a `CsiError` naming the field, so
a bad request is refused before anything is asked of the cluster (table-tested in
tests/unit/test_csi_requests.py)."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from lunastor.common.qos import FIELDS as QOS_FIELDS
from lunastor.common.qos import QosError, QosLimits
from lunastor.common.units import parse_size
from lunastor.csi import csi_pb2
from lunastor.csi.errors import CsiError, invalid

ZONE_KEY = "topology.lunastor.io/zone"
GiB = 1 << 30
DEFAULT_SIZE = GiB
MAX_SIZE = 1 << 50  # the REST API's limit (1 PiB)
FS_TYPES = ("ext4", "xfs")
DEFAULT_FS = "ext4"
#: keys the CO adds to the parameters (external-provisioner's --extra-create-metadata)
CO_PREFIX = "csi.storage.k8s.io/"

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
SINGLE_NODE_MODES = frozenset(
    {
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
    }
)
#: a LUN can be attached read-only to many nodes; read-write only to one (no cluster file
#: system on top: two writers of ext4 or xfs corrupt it), except a raw block volume whose
#: users coordinate themselves (SCSI reservations work across access points).
READ_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ID = {"vol": re.compile(r"vol-[0-9a-f]{16}"), "snap": re.compile(r"snap-[0-9a-f]{16}")}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def api_name(csi_name: str, what: str = "name") -> str:
    """The REST API name of a CSI name. CSI allows any Unicode up to 128 characters; names
    the API accepts as they are are kept (operators see them), others are hashed, the same
    way every time (so a retried create finds its volume)."""
    if not csi_name:
        raise invalid(f"{what}: required")
    if len(csi_name) > 128 or _CONTROL.search(csi_name):
        raise invalid(f"{what}: at most 128 characters, no control characters")
    if _NAME.fullmatch(csi_name):
        return csi_name
    return "csi-" + hashlib.sha256(csi_name.encode()).hexdigest()[:40]


def is_id(kind: str, value: str) -> bool:
    """Whether `value` can be a lunastor `kind` id at all (one that cannot names nothing)."""
    return bool(_ID[kind].fullmatch(value))


def required(value: str, what: str) -> str:
    if not value:
        raise invalid(f"{what}: required")
    return value


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def size_for(cr: csi_pb2.CapacityRange | None, block_size: int, minimum: int = 0) -> int:
    """The volume size for a capacity range: `required_bytes` (at least `minimum`, the
    source's size for a clone) rounded up to the block size; 1 GiB when nothing is asked;
    OUT_OF_RANGE when that exceeds `limit_bytes` or the API's maximum."""
    req = cr.required_bytes if cr is not None else 0
    limit = cr.limit_bytes if cr is not None else 0
    if req < 0 or limit < 0:
        raise invalid("capacity_range: bytes must not be negative")
    if limit and req > limit:
        raise CsiError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"capacity_range: required_bytes {req} exceeds limit_bytes {limit}",
        )
    if req == 0:
        req = min(DEFAULT_SIZE, limit) if limit else DEFAULT_SIZE
    size = round_up(max(req, minimum, block_size), block_size)
    if (limit and size > limit) or size > MAX_SIZE:
        raise CsiError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"capacity_range: {size} bytes (rounded to whole {block_size}-byte blocks) is over "
            f"the limit {limit or MAX_SIZE}",
        )
    return size


#: QoS limits as StorageClass / VolumeAttributesClass parameters (docs/qos.md): the limit
#: fields of `lunastor.common.qos` in camelCase (`writeIops`, `readBpsBurst`, `burstSeconds`)
QOS_KEYS = {
    "".join(w.capitalize() if i else w for i, w in enumerate(f.split("_"))): f for f in QOS_FIELDS
}


@dataclass(frozen=True)
class VolumeParameters:
    """The StorageClass parameters lunastor understands (docs/csi.md)."""

    replicas: int = 3
    block_size: int = 512
    fs_type: str = ""
    qos: dict[str, int | float] = field(default_factory=dict)

    KEYS = ("replicas", "blockSize", "fsType", *QOS_KEYS)


def qos_parameters(params: Mapping[str, str], what: str) -> dict[str, int | float]:
    """The QoS limits among `params` as the API's `qos` object (only the keys given; "0"
    clears a limit in a modify). Byte rates take sizes (`100Mi`, `1G`); the limits as a whole
    are checked here, so a bad combination is INVALID_ARGUMENT before any call."""
    out: dict[str, int | float] = {}
    for key, name in QOS_KEYS.items():
        raw = params.get(key)
        if raw is None:
            continue
        try:
            if name == "burst_seconds":
                value: int | float = float(raw)
                if not math.isfinite(value):
                    raise ValueError(raw)
            elif name.endswith(("bps", "bps_burst")):
                # Kubernetes quantities say Mi, Gi: sizes here say MiB, GiB
                value = parse_size(raw + "B" if raw.endswith("i") else raw)
            else:
                value = int(raw)
        except ValueError:
            raise invalid(f"{what}.{key}: {raw!r} is not a number") from None
        out[name] = value
    try:
        QosLimits.from_dict({k: v for k, v in out.items() if v})
    except QosError as exc:
        camel = next(k for k, n in QOS_KEYS.items() if n == exc.field)
        raise invalid(f"{what}.{camel}: {str(exc).split(': ', 1)[1]}") from None
    return out


def _int_param(params: Mapping[str, str], key: str, allowed: Iterable[int], default: int) -> int:
    raw = params.get(key)
    if raw is None:
        return default
    allowed = tuple(allowed)
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value not in allowed:
        raise invalid(f"parameters.{key}: {raw!r} is not one of {', '.join(map(str, allowed))}")
    return value


def volume_parameters(params: Mapping[str, str]) -> VolumeParameters:
    unknown = sorted(
        k for k in params if k not in VolumeParameters.KEYS and not k.startswith(CO_PREFIX)
    )
    if unknown:
        raise invalid(
            f"parameters: unknown {', '.join(unknown)} (known: {', '.join(VolumeParameters.KEYS)})"
        )
    fs_type = params.get("fsType", "")
    if fs_type and fs_type not in FS_TYPES:
        raise invalid(f"parameters.fsType: {fs_type!r} is not one of {', '.join(FS_TYPES)}")
    return VolumeParameters(
        replicas=_int_param(params, "replicas", range(1, 6), 3),
        block_size=_int_param(params, "blockSize", (512, 4096), 512),
        fs_type=fs_type,
        qos={k: v for k, v in qos_parameters(params, "parameters").items() if v},
    )


def mutable_parameters(params: Mapping[str, str]) -> dict[str, int | float]:
    """A VolumeAttributesClass's parameters (CreateVolume, ControllerModifyVolume): QoS
    limits only; any other key is INVALID_ARGUMENT."""
    unknown = sorted(k for k in params if k not in QOS_KEYS)
    if unknown:
        raise invalid(
            f"mutable_parameters: unknown {', '.join(unknown)} "
            f"(lunastor can change: {', '.join(QOS_KEYS)})"
        )
    return qos_parameters(params, "mutable_parameters")


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why lunastor cannot serve `cap`, or None when it can."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "access_type: block or mount is required"
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        return "access_mode: required"
    mode = cap.access_mode.mode
    if kind == "mount":
        if cap.mount.fs_type and cap.mount.fs_type not in FS_TYPES:
            return f"mount.fs_type {cap.mount.fs_type!r}: lunastor formats {', '.join(FS_TYPES)}"
        if mode not in SINGLE_NODE_MODES and mode not in READ_ONLY_MODES:
            return (
                f"access_mode {Mode.Name(mode)}: a file system volume is writable from one "
                "node only"
            )
    return None


def check_capabilities(caps: Sequence[csi_pb2.VolumeCapability], what: str) -> None:
    """INVALID_ARGUMENT unless `caps` is non-empty and lunastor can serve every one."""
    if not caps:
        raise invalid(f"{what}: at least one volume capability is required")
    for i, cap in enumerate(caps):
        problem = capability_problem(cap)
        if problem is not None:
            raise invalid(f"{what}[{i}].{problem}")


def fs_type_of(cap: csi_pb2.VolumeCapability, context: Mapping[str, str]) -> str:
    """The file system of a mount volume: the capability's, else the StorageClass's."""
    return cap.mount.fs_type or context.get("fsType", "") or DEFAULT_FS


# --- topology ------------------------------------------------------------------------------------


def zones_of(topologies: Iterable[csi_pb2.Topology]) -> list[str]:
    """The zones named by `topologies`, in order, each once. A topology without our key
    cannot be honoured: INVALID_ARGUMENT."""
    out: list[str] = []
    for t in topologies:
        zone = t.segments.get(ZONE_KEY)
        if not zone:
            raise invalid(f"accessibility_requirements: every topology needs {ZONE_KEY}")
        if zone not in out:
            out.append(zone)
    return out


def choose_zones(
    requirement: csi_pb2.TopologyRequirement | None,
    servers: Mapping[str, int],
    replicas: int,
) -> list[str]:
    """The zones a volume is placed in: [] (anywhere) without a requirement; else zones taken
    in the CO's order of preference (preferred first, then the rest of requisite, each in the
    requisite set when one is given) until they hold `replicas` live chunk servers, so every
    copy has its own server. `servers` counts live chunk servers per zone. A requirement no
    zone with a chunk server can meet is RESOURCE_EXHAUSTED (CSI: "unable to provision in
    accessible_topology")."""
    if requirement is None or not (requirement.requisite or requirement.preferred):
        return []
    requisite = zones_of(requirement.requisite)
    preferred = zones_of(requirement.preferred)
    order = [z for z in preferred if not requisite or z in requisite]
    order += [z for z in requisite if z not in order]
    chosen: list[str] = []
    count = 0
    for zone in order:
        if servers.get(zone, 0) <= 0:
            continue
        chosen.append(zone)
        count += servers[zone]
        if count >= replicas:
            return chosen
    if not chosen:
        raise CsiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"no live chunk server in the zones asked for ({', '.join(order)})",
        )
    raise CsiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"zones {', '.join(chosen)} hold {count} live chunk servers; {replicas} replicas "
        "need as many",
    )


def topologies(zones: Iterable[str]) -> list[csi_pb2.Topology]:
    return [csi_pb2.Topology(segments={ZONE_KEY: z}) for z in zones]


def zone_filter(topology: csi_pb2.Topology | None) -> str | None:
    if topology is None or not topology.segments:
        return None
    zone = topology.segments.get(ZONE_KEY)
    if zone is None:
        raise invalid(f"accessible_topology: only {ZONE_KEY} is known")
    return zone
