"""Request validation against the same JSON schemas the OpenAPI document publishes.

A small subset of JSON Schema, enough for our bodies and parameters: type (object, string,
integer, boolean, array), properties / required / additionalProperties, min/maxProperties,
const, min/maxLength, pattern (matched against the whole string), minimum / maximum / multipleOf,
enum, propertyNames, items, dependentRequired, if/then,
maxItems. Every failure names the field (`labels.team`, `source.snapshot_id`), so a client
gets a precise 400 instead of a guess.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from lunastor.meta.problems import Problem

Schema = dict[str, Any]


class Invalid(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    # Our patterns are anchored with ^...$; match the whole string so that "a\n" is refused.
    return re.compile(pattern.removeprefix("^").removesuffix("$"))


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "null":
        return value is None
    raise AssertionError(f"unsupported schema type {kind!r}")


def check(schema: Schema, value: Any, path: str = "") -> Any:
    """`value` if it conforms to `schema` (integers given as 3.0 become 3); raises `Invalid`."""
    where = path or "body"
    kinds = schema.get("type")
    if kinds is not None:
        options = kinds if isinstance(kinds, list) else [kinds]
        if not any(_type_ok(k, value) for k in options):
            raise Invalid(where, f"{where}: expected {' or '.join(options)}")
    if "const" in schema and value != schema["const"]:
        raise Invalid(where, f"{where}: must be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(v) for v in schema["enum"])
        raise Invalid(where, f"{where}: must be one of {allowed}")
    if isinstance(value, float) and "integer" in (kinds if isinstance(kinds, list) else [kinds]):
        value = int(value)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise Invalid(where, f"{where}: at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise Invalid(where, f"{where}: at most {schema['maxLength']} characters")
        if "pattern" in schema and not _regex(schema["pattern"]).fullmatch(value):
            raise Invalid(where, f"{where}: must match {schema['pattern']}")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise Invalid(where, f"{where}: must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise Invalid(where, f"{where}: must be <= {schema['maximum']}")
        if "multipleOf" in schema and value % schema["multipleOf"]:
            raise Invalid(where, f"{where}: must be a multiple of {schema['multipleOf']}")
    elif isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise Invalid(where, f"{where}: at most {schema['maxItems']} items")
        items = schema.get("items")
        if items is not None:
            value = [check(items, v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, dict):
        value = _check_object(schema, value, path)
    if "if" in schema and _may_hold(schema["if"], value):
        try:
            check(schema["if"], value, path)
        except Invalid:
            pass
        else:
            value = check(schema["then"], value, path)
    return value


def _may_hold(condition: Schema, value: Any) -> bool:
    """False when an `if` condition's required properties are missing from an object: it
    cannot hold, and deciding so by raising and catching `Invalid` cost most creates (no
    block_size given) a third of their validation time."""
    return not isinstance(value, dict) or all(k in value for k in condition.get("required", ()))


def _check_object(schema: Schema, value: dict[str, Any], path: str) -> dict[str, Any]:
    where = path or "body"
    prefix = f"{path}." if path else ""
    if len(value) < schema.get("minProperties", 0):
        raise Invalid(where, f"{where}: at least {schema['minProperties']} properties")
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        raise Invalid(where, f"{where}: at most {schema['maxProperties']} properties")
    for name in schema.get("required", []):
        if name not in value:
            raise Invalid(prefix + name, f"{prefix}{name}: required")
    for name, needs in schema.get("dependentRequired", {}).items():
        for other in needs:
            if name in value and other not in value:
                raise Invalid(prefix + other, f"{prefix}{other}: required with {name}")
    properties: dict[str, Schema] = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    names = schema.get("propertyNames")
    out: dict[str, Any] = {}
    for name, item in value.items():
        if names is not None:
            check(names, name, f"{prefix}{name}")
        if name in properties:
            out[name] = check(properties[name], item, prefix + name)
        elif extra is False:
            raise Invalid(prefix + name, f"{prefix}{name}: unknown field")
        elif isinstance(extra, dict):
            out[name] = check(extra, item, prefix + name)
        else:
            out[name] = item
    return out


def validate(schema: Schema, value: Any, where: str = "") -> Any:
    """`check`, turning a failure into the API's 400 problem naming the field."""
    try:
        return check(schema, value, where)
    except Invalid as exc:
        raise Problem(400, "invalid_field", exc.message, field=exc.field) from None
