"""Per-volume QoS on the command line (docs/qos.md): the limit options of `volume create` and
`volume set-qos`, and `volume stats`, a volume's live IO across its access points."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import click
from rich.live import Live
from rich.table import Table

from lunastor.cli.options import SIZE, Cli, api_command, console, fail, human_bytes
from lunastor.common.qos import FIELDS, QosError, QosLimits

# (option, record field, help); byte rates take sizes ("100MiB" = 100 MiB/s)
_OPTIONS = (
    ("--iops", "iops", "IOPS, reads and writes together"),
    ("--read-iops", "read_iops", "read IOPS"),
    ("--write-iops", "write_iops", "write IOPS"),
    ("--bps", "bps", "bytes/s, reads and writes together (e.g. 200MiB)"),
    ("--read-bps", "read_bps", "read bytes/s"),
    ("--write-bps", "write_bps", "write bytes/s"),
)


def qos_options(f: Callable[..., None]) -> Callable[..., None]:
    """The limit options (each rate, its burst, --burst-seconds); 0 clears a limit."""
    f = click.option(
        "--burst-seconds",
        "burst_seconds",
        type=click.FloatRange(0),
        help="how long a burst rate may last after idling (default 1)",
    )(f)
    for option, name, text in reversed(_OPTIONS):
        kind = SIZE if name.endswith("bps") else click.IntRange(0)
        f = click.option(
            f"{option}-burst", f"{name}_burst", type=kind, help=f"burst rate for {option}"
        )(f)
        f = click.option(option, name, type=kind, help=f"limit: {text}; 0 = none")(f)
    return f


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The limit options given on the command line (None: not given)."""
    return {k: v for k, v in options.items() if v is not None}


def limits_for_create(options: dict[str, Any]) -> dict[str, Any]:
    """The `qos` of a create body; a bad combination fails here, naming the option."""
    try:
        return QosLimits.from_dict(given(options)).to_dict()
    except QosError as exc:
        fail(f"--{exc.field.replace('_', '-')}: {str(exc).split(': ', 1)[1]}")


def describe(qos: dict[str, Any]) -> str:
    """Limits as one line: `read_iops=500 bps=100.0 MiB/s (burst 200.0 MiB/s for 1s)`."""
    if not qos:
        return "none"
    parts = []
    for name in ("iops", "read_iops", "write_iops", "bps", "read_bps", "write_bps"):
        if not qos.get(name):
            continue
        show: Callable[[Any], str] = (
            (lambda v: f"{human_bytes(v)}/s") if name.endswith("bps") else str
        )
        text = f"{name}={show(qos[name])}"
        if qos.get(f"{name}_burst"):
            text += f" (burst {show(qos[f'{name}_burst'])} for {qos.get('burst_seconds') or 1}s)"
        parts.append(text)
    return " ".join(parts)


def register(volume: click.Group, volume_id: Callable[[Cli, str], str]) -> None:
    @volume.command("set-qos")
    @click.argument("volume_ref", metavar="VOLUME")
    @qos_options
    @click.option("--clear", is_flag=True, help="remove every limit first")
    @api_command
    def volume_set_qos(cli: Cli, volume_ref: str, clear: bool, **options: Any) -> None:
        """Change a volume's QoS limits online (open sessions follow within a second).

        Only the limits given change; 0 removes one, --clear removes all."""
        changes: dict[str, Any] = given(options)
        if clear:
            changes = {**dict.fromkeys(FIELDS, None), **changes}
        if not changes:
            fail("give at least one limit (or --clear)")
        vid = volume_id(cli, volume_ref)
        out = cli.call("PATCH", f"/v1/volumes/{vid}", {"qos": changes})
        cli.emit(out, lambda v: console.print(f"{v['name']}: {describe(v['qos'])}"))

    @volume.command("stats")
    @click.argument("volume_ref", metavar="VOLUME")
    @click.option("--interval", type=click.FloatRange(0.2), default=1.0, show_default=True)
    @click.option("--count", type=click.IntRange(1), help="stop after this many intervals")
    @api_command
    def volume_stats(cli: Cli, volume_ref: str, interval: float, count: int | None) -> None:
        """A volume's IO live, summed over every access point serving it: IOPS, bytes/s,
        latency (mean, p50, p99 of the interval), time throttled by its QoS limits.
        With --json, one JSON object per interval."""
        vid = volume_id(cli, volume_ref)
        vol = cli.call("GET", f"/v1/volumes/{vid}")
        path = f"/v1/volumes/{vid}/metrics"
        prev = cli.call("GET", path)
        shown = 0
        live = None if cli.as_json else Live(console=console, auto_refresh=False)
        try:
            if live is not None:
                live.start()
            while count is None or shown < count:
                time.sleep(max(0.0, interval - (time.time() - prev["at"])))
                now = cli.call("GET", path)
                stats = interval_stats(prev, now)
                prev = now
                shown += 1
                if live is None:
                    click.echo(json_line({"volume_id": vid, **stats}))
                else:
                    live.update(stats_table(vol, stats), refresh=True)
        except KeyboardInterrupt:
            pass
        finally:
            if live is not None:
                live.stop()


def json_line(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, separators=(",", ":"))


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile `q` of a cumulative histogram."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    want = q * buckets[-1][1]
    for le, n in buckets:
        if n >= want:
            return le
    return math.inf


def interval_stats(prev: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """Rates between two answers of `GET /v1/volumes/{id}/metrics`."""
    seconds = max(1e-6, now["at"] - prev["at"])
    out: dict[str, Any] = {"seconds": round(seconds, 3)}
    for op in ("read", "write"):
        a, b = prev.get(op, {}), now.get(op, {})
        ops = max(0.0, b.get("ops", 0) - a.get("ops", 0))
        before = dict((le, n) for le, n in a.get("buckets", []))
        deltas = [(le, n - before.get(le, 0.0)) for le, n in b.get("buckets", [])]
        if deltas:  # the +Inf bucket is not sent: it holds every command
            deltas.append((math.inf, ops))
        mean = (b.get("seconds", 0) - a.get("seconds", 0)) / ops if ops else None
        p50, p99 = _quantile(deltas, 0.5), _quantile(deltas, 0.99)
        throttled = b.get("throttled_seconds", 0) - a.get("throttled_seconds", 0)
        out[op] = {
            "iops": round(ops / seconds, 1),
            "bytes_per_second": round(max(0.0, b.get("bytes", 0) - a.get("bytes", 0)) / seconds),
            "latency_mean_ms": None if mean is None else round(mean * 1000, 3),
            "latency_p50_ms_le": None if p50 is None else p50 * 1000,
            "latency_p99_ms_le": None if p99 is None else p99 * 1000,
            # seconds its commands waited for the limiter, per second (at QD n: up to n)
            "throttled_per_second": round(max(0.0, throttled) / seconds, 3),
        }
    out["access_points"] = [
        {"chunk_id": p["chunk_id"], "reachable": p["reachable"]} for p in now["access_points"]
    ]
    return out


def stats_table(vol: dict[str, Any], stats: dict[str, Any]) -> Table:
    t = Table(
        title=f"{vol['name']} ({vol['id']})  limits: {describe(vol.get('qos') or {})}",
        title_justify="left",
    )
    for col in ("op", "IOPS", "bytes/s", "mean", "p50 <=", "p99 <=", "throttled"):
        t.add_column(col)

    def ms(v: float | None) -> str:
        return "-" if v is None else ("inf" if v == math.inf else f"{v:.3g} ms")

    for op in ("read", "write"):
        s = stats[op]
        t.add_row(
            op,
            f"{s['iops']:,.0f}",
            f"{human_bytes(s['bytes_per_second'])}/s",
            ms(s["latency_mean_ms"]),
            ms(s["latency_p50_ms_le"]),
            ms(s["latency_p99_ms_le"]),
            f"{s['throttled_per_second']:.2f} s/s",
        )
    down = [p["chunk_id"] for p in stats["access_points"] if not p["reachable"]]
    if down:
        t.caption = f"not answering (left out): {', '.join(down)}"
    return t
