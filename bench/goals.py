"""The goals the issues set for `make bench` lines (closed issues' too: regression checks),

A measure is a named number the suite collects (`measures()`): `<system>.<job>.<what>` for
the job tables (`value`: IOPS or MB/s; `x_tgt`, `x_gluster`: ratios; `cpu_us`: server CPU per
IO), plus the extra lines' own names (`rebuild.x_disk`, `noisy.limited_x_alone`, ...). A goal
whose measure is missing (its part was not run, or the feature does not exist yet) is n/a.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass

from bench.qemu_img import JOBS, Job, JobResult
from bench.report import REPLICATED_ANCHOR, SINGLE_COPY_ANCHOR, Outcome, anchor_ratio, metric


@dataclass(frozen=True)
class Goal:
    issue: int
    text: str
    measure: str
    op: str  # ">=" or "<="
    threshold: float

    def needs(self) -> set[str]:
        """The parts that must have run for this goal to be checked (see `lines`)."""
        part, _, what = self.measure.rpartition(".")
        anchor = what.removeprefix("x_")
        if anchor in (SINGLE_COPY_ANCHOR, REPLICATED_ANCHOR):  # the anchor's same job too
            return {part, f"{anchor}.{part.partition('.')[2]}"}
        return {part}

    def check(self, measures: Mapping[str, float]) -> bool | None:
        value = measures.get(self.measure)
        if value is None:
            return None
        compare: Callable[[float, float], bool] = operator.ge if self.op == ">=" else operator.le
        return compare(value, self.threshold)


def _every_line(issue: int, system: str, anchor: str, threshold: float) -> list[Goal]:
    return [
        Goal(issue, f"{system} {j.label} >= {threshold}x {anchor}", f"{system}.{j.name}.x_{anchor}",
             ">=", threshold)
        for j in JOBS
    ]  # fmt: skip


GOALS: tuple[Goal, ...] = (
    # issue 13: the iSCSI front end, standalone target against tgt on the same file
    Goal(13, "standalone 4 KiB random read >= 2x tgt", "standalone.rr4k.x_tgt", ">=", 2.0),
    Goal(13, "standalone 1 MiB read >= 2x tgt", "standalone.sr1m.x_tgt", ">=", 2.0),
    Goal(13, "standalone 4 KiB random write >= 1.5x tgt", "standalone.rw4k.x_tgt", ">=", 1.5),
    Goal(13, "standalone 1 MiB write >= 1.2x tgt", "standalone.sw1m.x_tgt", ">=", 1.2),
    Goal(13, "standalone QD1 read latency <= tgt's", "standalone.qd1r.x_tgt", ">=", 1.0),
    Goal(13, "standalone QD1 write latency <= tgt's", "standalone.qd1w.x_tgt", ">=", 1.0),
    Goal(13, "standalone CPU per 4 KiB read <= 12 us", "standalone.rr4k.cpu_us", "<=", 12.0),
    # issue 12: the replicated data path, the 3-replica volume
    *_every_line(12, "r3", REPLICATED_ANCHOR, 1.5),
    Goal(12, "r3 4 KiB random read >= 1x tgt", "r3.rr4k.x_tgt", ">=", 1.0),
    Goal(12, "r3 1 MiB read >= 1x tgt", "r3.sr1m.x_tgt", ">=", 1.0),
    Goal(12, "r3 QD1 read >= 1x tgt", "r3.qd1r.x_tgt", ">=", 1.0),
    Goal(12, "r3 4 KiB random write >= 0.5x tgt", "r3.rw4k.x_tgt", ">=", 0.5),
    Goal(12, "r3 QD1 write >= 0.5x tgt", "r3.qd1w.x_tgt", ">=", 0.5),
    Goal(12, "r3 1 MiB write >= 0.5x tgt", "r3.sw1m.x_tgt", ">=", 0.5),
    Goal(12, "r3 QD1 write+flush >= 1,500/s", "r3.qd1wf.value", ">=", 1500),
    Goal(12, "r3 CPU per 4 KiB write <= 100 us (3 servers)", "r3.rw4k.cpu_us", "<=", 100),
    Goal(12, "re-replication >= 0.5x the disk's bandwidth", "rebuild.x_disk", ">=", 0.5),
    Goal(12, "foreground IOPS during re-replication >= 70%", "rebuild.fg_ratio", ">=", 0.7),
    Goal(12, "writes sequenced by the access point >= 95%", "locality.share", ">=", 0.95),
    # issue 17: a chunk server on every core, two clients on one server of 1-replica volumes
    Goal(17, "2 workers >= 1.6x 1 worker, 4 KiB random write", "workers.rw4k.x_one", ">=", 1.6),
    Goal(17, "2 workers >= 1.6x 1 worker, 4 KiB random read", "workers.rr4k.x_one", ">=", 1.6),
    # issue 18: QoS, the noisy neighbour
    Goal(18, "A's p99 with B limited <= 1.5x A alone", "noisy.limited_x_alone", "<=", 1.5),
)


def job_measures(
    jobs: Sequence[Job], results: Mapping[str, Mapping[str, Outcome]]
) -> dict[str, float]:
    """`<system>.<job>.value|x_tgt|x_gluster|cpu_us` for every measured job."""
    out: dict[str, float] = {}
    for system, by_job in results.items():
        for job in jobs:
            result = by_job.get(job.name)
            if not isinstance(result, JobResult):
                continue
            key = f"{system}.{job.name}"
            out[f"{key}.value"] = metric(job, result)
            out[f"{key}.cpu_us"] = result.server_cpu_us_per_io
            for anchor in (SINGLE_COPY_ANCHOR, REPLICATED_ANCHOR):
                r = anchor_ratio(job, results, system, anchor)
                if r is not None:
                    out[f"{key}.x_{anchor}"] = r
    return out


def lines(measures: Mapping[str, float], ran: Set[str], goals: Sequence[Goal] = GOALS) -> list[str]:
    """One line per goal whose part ran: met / NOT met / n/a, with the measured value. `ran`
    holds a measure's name without its last component: "<system>.<job>" for each job run,
    and the extra lines' names ("rebuild", "noisy", "locality"). A ratio goal needs its
    anchor's job run too."""
    out = []
    for goal in goals:
        if not goal.needs() <= ran:
            continue
        status = {True: "met", False: "NOT met", None: "n/a"}[goal.check(measures)]
        value = measures.get(goal.measure)
        shown = "n/a" if value is None else f"{value:,.2f}"
        out.append(f"  #{goal.issue:<3} {goal.text:58} {shown:>10}  {status}")
    return out
