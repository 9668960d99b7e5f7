"""JSON schemas of the REST API: request bodies, parameters and responses.

The handlers validate against these and `openapi.py` publishes them, so the document and the
server cannot disagree. Patterns are anchored and matched against the whole value.
"""

from __future__ import annotations

from typing import Any

from lunastor.common.qos import BURSTS, MAX_BURST_SECONDS, MAX_RATE, RATES
from lunastor.common.records import MAX_LUN

Schema = dict[str, Any]

MAX_VOLUME_SIZE = 1 << 50  # 1 PiB
MAX_LABELS = 64
MAX_INITIATORS_PER_LUN = 256
LIST_LIMIT_MAX = 1000
LIST_LIMIT_DEFAULT = 100

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VOLUME_ID = r"^vol-[0-9a-f]{16}$"
SNAPSHOT_ID = r"^snap-[0-9a-f]{16}$"
OPERATION_ID = r"^op-[0-9a-f]{16}$"
CHUNK_ID = r"^chunk-[0-9a-f]{12}$"
TARGET_IQN = r"^iqn\.2026-11\.io\.lunastor:tgt-(0|[1-9][0-9]{0,3})$"
# RFC 3720 3.2.6.3: iqn., eui. and naa. names; stored lower case (names are case-insensitive).
INITIATOR = (
    r"^(iqn\.[0-9]{4}-[0-9]{2}\.[A-Za-z0-9][A-Za-z0-9.-]*(:[A-Za-z0-9.:_-]+)?"
    r"|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16}([0-9A-Fa-f]{16})?)$"
)
LABEL_KEY = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$"
PRINTABLE = r"^[\x20-\x7e]*$"
CHAP_USER = r"^[\x21-\x7e]{1,255}$"
CHAP_SECRET = r"^[\x21-\x7e]{12,255}$"  # RFC 7143 12.1.3: at least 96 bits

name = {"type": "string", "pattern": NAME, "maxLength": 128}
volume_id = {"type": "string", "pattern": VOLUME_ID}
snapshot_id = {"type": "string", "pattern": SNAPSHOT_ID}
operation_id = {"type": "string", "pattern": OPERATION_ID}
chunk_id = {"type": "string", "pattern": CHUNK_ID}
target_iqn = {"type": "string", "pattern": TARGET_IQN}
initiator = {"type": "string", "pattern": INITIATOR, "maxLength": 223}
size_bytes = {"type": "integer", "minimum": 512, "maximum": MAX_VOLUME_SIZE, "multipleOf": 512}
labels = {
    "type": "object",
    "maxProperties": MAX_LABELS,
    "propertyNames": {"type": "string", "pattern": LABEL_KEY, "maxLength": 63},
    "additionalProperties": {"type": "string", "maxLength": 253, "pattern": PRINTABLE},
}
ZONE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
zones = {
    "type": "array",
    "description": "place the volume's extents on chunk servers of these zones only (CSI topology)",
    "items": {"type": "string", "pattern": ZONE},
    "maxItems": 16,
}
_rate = {"type": "integer", "minimum": 0, "maximum": MAX_RATE}
_seconds = {"type": "number", "minimum": 0, "maximum": MAX_BURST_SECONDS}
qos = {
    "type": "object",
    "description": "per-volume QoS limits (docs/qos.md): IOPS and bytes per second for reads, "
    "writes and both (0: unlimited); `<rate>_burst`: the rate allowed for `burst_seconds` "
    "after idling",
    "properties": {
        **{name: _rate for name in RATES + BURSTS},
        "burst_seconds": _seconds,
    },
    "additionalProperties": False,
}
# PATCH: a field set to null (or 0) clears that limit
qos_patch = {
    **qos,
    "properties": {
        **{
            name: {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_RATE}
            for name in RATES + BURSTS
        },
        "burst_seconds": {"type": ["number", "null"], "minimum": 0, "maximum": MAX_BURST_SECONDS},
    },
}
source = {
    "type": "object",
    "description": "exactly one of snapshot_id and volume_id",
    "properties": {"snapshot_id": snapshot_id, "volume_id": volume_id},
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
}

# --- request bodies ---------------------------------------------------------------------------

VOLUME_CREATE: Schema = {
    "type": "object",
    "required": ["name", "size_bytes"],
    "properties": {
        "name": name,
        "size_bytes": size_bytes,
        "replicas": {"type": "integer", "minimum": 1, "maximum": 5, "default": 3},
        "block_size": {"type": "integer", "enum": [512, 4096], "default": 512},
        "labels": labels,
        "source": source,
        "zones": zones,
        "qos": qos,
    },
    "additionalProperties": False,
    # A 4096-byte block size needs a size in whole 4096-byte blocks.
    "if": {"properties": {"block_size": {"const": 4096}}, "required": ["block_size"]},
    "then": {"properties": {"size_bytes": {"multipleOf": 4096}}},
}
VOLUME_EXPAND: Schema = {
    "type": "object",
    "required": ["size_bytes"],
    "properties": {"size_bytes": size_bytes},
    "additionalProperties": False,
}
VOLUME_UPDATE: Schema = {
    "type": "object",
    "required": ["qos"],
    "properties": {"qos": qos_patch},
    "additionalProperties": False,
}
EXPORT_CREATE: Schema = {
    "type": "object",
    "required": ["initiator"],
    "properties": {
        "initiator": initiator,
        # only if no other initiator sees the LUN (409 volume_in_use otherwise)
        "exclusive": {"type": "boolean", "default": False},
    },
    "additionalProperties": False,
}
SNAPSHOT_CREATE: Schema = {
    "type": "object",
    "required": ["name", "volume_id"],
    "properties": {"name": name, "volume_id": volume_id},
    "additionalProperties": False,
}
CHAP_SET: Schema = {
    "type": "object",
    "required": ["user", "secret"],
    "properties": {
        "user": {"type": "string", "pattern": CHAP_USER},
        "secret": {"type": "string", "pattern": CHAP_SECRET},
        "mutual_user": {"type": "string", "pattern": CHAP_USER},
        "mutual_secret": {"type": "string", "pattern": CHAP_SECRET},
    },
    "additionalProperties": False,
    "dependentRequired": {"mutual_user": ["mutual_secret"], "mutual_secret": ["mutual_user"]},
}
CHAP_ROTATE: Schema = {
    "type": "object",
    "required": ["secret"],
    "properties": {
        "secret": {"type": "string", "pattern": CHAP_SECRET},
        "mutual_secret": {"type": "string", "pattern": CHAP_SECRET},
    },
    "additionalProperties": False,
}

# --- parameters -------------------------------------------------------------------------------

LIMIT = {"type": "integer", "minimum": 1, "maximum": LIST_LIMIT_MAX}
NEXT = {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,512}$"}
FORCE = {"type": "boolean"}

# --- responses --------------------------------------------------------------------------------

_str = {"type": "string"}
_int = {"type": "integer"}
_num = {"type": "number"}
_nullable_int = {"type": ["integer", "null"]}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **(optional or {})},
    }


def _page(item: str) -> Schema:
    return _obj(
        {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
            "next": {"type": ["string", "null"]},
            "revision": _int,
        }
    )


RESPONSES: dict[str, Schema] = {
    "Problem": _obj(
        {"type": _str, "title": _str, "status": _int, "code": _str, "detail": _str},
        {"field": _str},
    ),
    "Volume": _obj(
        {
            "id": _str,
            "name": _str,
            "size_bytes": _int,
            "replicas": _int,
            "block_size": _int,
            "labels": {"type": "object", "additionalProperties": _str},
            "source": {
                "oneOf": [
                    {"type": "null"},
                    {"type": "object", "additionalProperties": _str},
                ]
            },
            "state": _str,
            "created_at": _num,
            "target_iqn": _str,
            "lun": {"type": "integer", "minimum": 1, "maximum": MAX_LUN},
        },
        {
            "zones": {"type": "array", "items": _str},
            "qos": {"type": "object", "additionalProperties": _num},
        },
    ),
    "VolumePage": _page("Volume"),
    "Export": _obj(
        {"volume_id": _str, "initiator": _str, "portal": _str, "target_iqn": _str, "lun": _int}
    ),
    "ExportList": _obj(
        {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Export"}}}
    ),
    "Snapshot": _obj(
        {
            "id": _str,
            "name": _str,
            "source_volume_id": _str,
            "size_bytes": _int,
            "created_at": _num,
            "ready_to_use": {"type": "boolean"},
        }
    ),
    "SnapshotPage": _page("Snapshot"),
    "Chap": _obj(
        {"chap_enabled": {"type": "boolean"}, "mutual_chap_enabled": {"type": "boolean"}},
        {"user": _str, "mutual_user": _str, "updated_at": _num},
    ),
    "Target": _obj(
        {
            "iqn": _str,
            "index": _int,
            "luns": _int,
            "chap_enabled": {"type": "boolean"},
            "mutual_chap_enabled": {"type": "boolean"},
        },
        {"chap_user": _str, "mutual_user": _str},
    ),
    "TargetList": _obj(
        {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Target"}},
            "discovery_chap_enabled": {"type": "boolean"},
        }
    ),
    "ChunkServer": _obj(
        {
            "id": _str,
            "state": {"type": "string", "enum": ["up", "draining", "drained", "down"]},
            "admin_state": {"type": ["string", "null"]},
            "zone": _str,
            "portal": _str,
            "capacity": _nullable_int,
            "free": _nullable_int,
            "holds_extents": {"type": "boolean"},
        },
        {"operation_id": {"type": ["string", "null"]}},
    ),
    "ChunkServerList": _obj(
        {"items": {"type": "array", "items": {"$ref": "#/components/schemas/ChunkServer"}}}
    ),
    "Capacity": _obj(
        {
            "total_bytes": _int,
            "free_bytes": _int,
            "chunk_servers": _int,
            "zones": {
                "type": "array",
                "items": _obj(
                    {"zone": _str, "total_bytes": _int, "free_bytes": _int, "chunk_servers": _int}
                ),
            },
        }
    ),
    "Health": _obj(
        {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "etcd_revision": _int,
            "chunk_servers_up": _int,
            "chunk_servers_down": _int,
            "meta_instances": _int,
            "redirector_leader": {"type": ["string", "null"]},
            "problems": {"type": "array", "items": _str},
        }
    ),
    "Cluster": {"type": "object"},
    "Operation": _obj(
        {
            "id": _str,
            "kind": _str,
            "subject": _str,
            "state": {"type": "string", "enum": ["running", "succeeded", "failed"]},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "created_at": _num,
            "updated_at": _num,
            "detail": _str,
        }
    ),
    "OperationPage": _page("Operation"),
}

# --- the dashboard's views (volume_status.py, volume_metrics.py, events.py, whoami.py) ----------

_health = {"type": "string", "enum": ["ok", "degraded", "rebuilding", "unavailable"]}
_health_fields: dict[str, Schema] = {
    "volume_id": _str,
    "health": _health,
    "health_detail": _str,
    "extents": _int,
    "extents_by_health": {"type": "object", "additionalProperties": _int},
    "exports": _int,
}
_op_totals = _obj(
    {
        "ops": _num,
        "bytes": _num,
        "seconds": _num,
        "buckets": {"type": "array", "items": {"type": "array", "items": _num}},
    },
    {"throttled_seconds": _num},
)
RESPONSES.update(
    {
        "VolumeStatusList": _obj(
            {
                "items": {
                    "type": "array",
                    "items": _obj(
                        {**_health_fields, "served_by": {"type": "array", "items": _str}}
                    ),
                },
                "revision": _int,
            }
        ),
        "VolumeStatus": _obj(
            {
                **_health_fields,
                "served_by": {
                    "type": "array",
                    "items": _obj({"chunk_id": _str, "initiator": _str}),
                },
                "extent_size": _nullable_int,
                "scrub_errors": _int,
                "extent_map": {
                    "type": "array",
                    "items": _obj(
                        {
                            "index": _int,
                            "gen": _int,
                            "converging": {"type": "boolean"},
                            "health": _health,
                            "replicas": {
                                "type": "array",
                                "items": _obj(
                                    {
                                        "chunk_id": _str,
                                        "state": {"enum": ["up", "draining", "down"]},
                                        "zone": _str,
                                    }
                                ),
                            },
                        }
                    ),
                },
                "revision": _int,
            }
        ),
        "VolumeMetrics": _obj(
            {
                "volume_id": _str,
                "at": _num,
                "read": _op_totals,
                "write": _op_totals,
                "access_points": {
                    "type": "array",
                    "items": _obj(
                        {"chunk_id": _str, "admin_address": _str, "reachable": {"type": "boolean"}},
                        {"error": _str},
                    ),
                },
            }
        ),
        "EventList": _obj(
            {
                "items": {
                    "type": "array",
                    "items": _obj(
                        {
                            "id": _str,
                            "at": _num,
                            "kind": _str,
                            "severity": {"enum": ["info", "warning", "error"]},
                            "what": _str,
                            "subject": _str,
                            "detail": _str,
                            "source": _str,
                        }
                    ),
                }
            }
        ),
        "WhoAmI": _obj(
            {
                "role": {"enum": ["admin", "csi", "reader"]},
                "may": {"type": "array", "items": _str},
            }
        ),
    }
)
