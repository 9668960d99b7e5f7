"""One typed configuration source for every daemon: TOML file, then environment, then flags.

Each daemon declares its configuration as nested dataclasses. `load_config` fills one from, in
increasing precedence:

1. the defaults in the dataclass,
2. a TOML file (`--config PATH`), whose tables mirror the nested dataclasses,
3. environment variables `LUNASTOR_<FIELD>` / `LUNASTOR_<SECTION>__<FIELD>` (upper case),
4. `--set section.field=value` flags.

Unknown keys and values of the wrong type are errors that name the key, so a typo in a config
file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

ENV_PREFIX = "LUNASTOR_"


class ConfigError(Exception):
    """A configuration value is missing, unknown or malformed; the message names it."""


@dataclasses.dataclass
class EtcdSettings:
    endpoints: list[str] = dataclasses.field(default_factory=lambda: ["127.0.0.1:2379"])
    namespace: str = "/lunastor"  # every key lunastor writes lives under this prefix
    timeout: float = 5.0
    ca_cert: str = ""
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = ""


@dataclasses.dataclass
class LogSettings:
    level: str = "info"
    format: str = "kv"  # "kv" (key=value, for people) or "json" (for collectors)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a TOML value or a string (env/flag) to `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value == "" and len(args) == 1):
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _apply_table(obj: Any, table: Mapping[str, Any], where: str) -> None:
    hints = _field_types(type(obj))
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in hints:
            raise ConfigError(f"{where}{key}: unknown setting")
        tp = hints[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{key}: expected a table")
            _apply_table(getattr(obj, name), value, f"{where}{key}.")
        else:
            setattr(obj, name, _coerce(value, tp, f"{where}{key}"))


def _set_path(obj: Any, path: str, raw: str, where: str) -> None:
    parts = path.replace("-", "_").split(".")
    target = obj
    for part in parts[:-1]:
        hints = _field_types(type(target))
        if part not in hints or not _is_dataclass_type(hints[part]):
            raise ConfigError(f"{where}: unknown setting {path!r}")
        target = getattr(target, part)
    hints = _field_types(type(target))
    last = parts[-1]
    if last not in hints or _is_dataclass_type(hints[last]):
        raise ConfigError(f"{where}: unknown setting {path!r}")
    setattr(target, last, _coerce(raw, hints[last], path))


def env_paths(cls: type, prefix: str = "") -> Iterable[str]:
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            yield from env_paths(tp, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def env_var_name(path: str) -> str:
    """`etcd.endpoints` -> `LUNASTOR_ETCD__ENDPOINTS`."""
    return ENV_PREFIX + path.replace(".", "__").upper()


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Iterable[str] = (),
) -> C:
    """Build a `cls` from defaults, an optional TOML file, the environment and `key=value` flags."""
    config = cls()
    if path:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        _apply_table(config, table, f"{path}: ")
    env = os.environ if env is None else env
    for dotted in env_paths(cls):
        var = env_var_name(dotted)
        if var in env:
            _set_path(config, dotted, env[var], var)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        _set_path(config, key.strip(), value, f"--set {key.strip()}")
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def to_toml_table(table: Mapping[str, Any], _prefix: str = "") -> str:
    """Render a mapping as TOML; nested mappings become tables (`[etcd]`, `[auth]`, ...)."""
    scalars = [
        f"{k} = {_toml_value(v)}"
        for k, v in table.items()
        if not isinstance(v, Mapping) and v is not None
    ]
    tables = [
        f"[{_prefix}{k}]\n" + to_toml_table(v, f"{_prefix}{k}.").rstrip("\n")
        for k, v in table.items()
        if isinstance(v, Mapping)
    ]
    parts = ["\n".join(scalars)] if scalars else []
    return "\n\n".join(parts + tables) + "\n"


def to_toml(config: Any) -> str:
    """Render a config dataclass as TOML."""
    return to_toml_table(dataclasses.asdict(config))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot render {value!r} as TOML")
