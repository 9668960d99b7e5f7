"""The comparison tables: one per job group, a row per (job, system), with ratios against the
two anchors (tgt, the single-copy C target; GlusterFS replica 3, the replicated one) and the
CPU each system's processes spent per IO."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.qemu_img import Job, JobResult

SINGLE_COPY_ANCHOR = "tgt"
REPLICATED_ANCHOR = "gluster"


@dataclass(frozen=True)
class SystemInfo:
    name: str
    label: str
    servers: str  # what the server CPU column sums ("tgtd", "3 chunk servers")
    others: str | None = None  # the separately reported group, if any


# a job's outcome on one system: measured, or why not
Outcome = JobResult | str


def metric(job: Job, result: JobResult) -> float:
    """The number a job is compared by: MB/s for 1 MiB jobs, IOPS otherwise."""
    return result.mbps if job.by_bandwidth else result.iops


def ratio(value: float | None, anchor: float | None) -> float | None:
    if value is None or anchor is None or anchor <= 0 or math.isnan(anchor):
        return None
    return value / anchor


def anchor_ratio(
    job: Job, results: Mapping[str, Mapping[str, Outcome]], system: str, anchor: str
) -> float | None:
    """`system`'s metric on `job` over `anchor`'s, when both were measured."""
    ours = results.get(system, {}).get(job.name)
    theirs = results.get(anchor, {}).get(job.name)
    if not isinstance(ours, JobResult) or not isinstance(theirs, JobResult):
        return None
    return ratio(metric(job, ours), metric(job, theirs))


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _fmt_us(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.1f} us"


def group_table(
    jobs: Sequence[Job],
    systems: Sequence[SystemInfo],
    results: Mapping[str, Mapping[str, Outcome]],
) -> list[str]:
    """One table for jobs of one group (same block size, pattern and depth)."""
    first = jobs[0]
    unit = "MB/s" if first.by_bandwidth else "IOPS"
    qd1 = first.depth == 1
    head = f"{'job':14} {'system':30} {unit:>9} " + (f"{'mean lat':>10} " if qd1 else "")
    head += f"{'x tgt':>7} {'x gluster':>9} {'server CPU/IO':>14} {'control CPU/IO':>14} "
    head += f"{'client CPU':>10}"
    lines = [f"{first.group} ({unit}; more is better)", head]
    for job in jobs:
        for system in systems:
            outcome = results.get(system.name, {}).get(job.name)
            if outcome is None:
                continue
            name = f"{job.op:14} {system.label:30}"
            if isinstance(outcome, str):
                lines.append(f"{name} failed: {outcome}")
                continue
            value = f"{metric(job, outcome):>9,.0f}"
            if qd1:
                value += f" {outcome.latency_us:>7,.0f} us"
            other = None if outcome.other_cpu is None else outcome.other_cpu.per_io_us(outcome.ios)
            lines.append(
                f"{name} {value} "
                f"{_fmt_ratio(anchor_ratio(job, results, system.name, SINGLE_COPY_ANCHOR)):>7} "
                f"{_fmt_ratio(anchor_ratio(job, results, system.name, REPLICATED_ANCHOR)):>9} "
                f"{_fmt_us(outcome.server_cpu_us_per_io):>14} {_fmt_us(other):>14} "
                f"{outcome.client_cpu_percent:>9.0f}%"
            )
    return lines


def tables(
    jobs: Sequence[Job],
    systems: Sequence[SystemInfo],
    results: Mapping[str, Mapping[str, Outcome]],
) -> list[str]:
    """Every group's table, in the order the jobs are given, with a legend of the systems;
    nothing when no system was measured."""
    if not any(results.values()):
        return []
    lines = ["systems (server CPU/IO sums the CPU of these processes over each job):"]
    for s in systems:
        if s.name in results:
            others = f"; control CPU/IO: {s.others}" if s.others else ""
            lines.append(f"  {s.label:30} server CPU/IO: {s.servers}{others}")
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    for group in groups.values():
        lines.append("")
        lines += group_table(group, systems, results)
    return lines
