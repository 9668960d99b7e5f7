"""The benchmark's own logic, without running a system: the parsers of what qemu-img bench,
iscsi-load, /proc and /metrics print, the CPU accounting maths, calibration, the random
stride, ratios, tables and goals."""

from __future__ import annotations

import itertools
import math
import sys

import pytest

from bench import goals, locality
from bench.cpu import CLK_TCK, CpuDelta, delta, parse_proc_stat, run_child, sample
from bench.iscsi_load import parse_load_output
from bench.qemu_img import (
    JOB_BY_NAME,
    JOBS,
    JobResult,
    bench_argv,
    next_probe_count,
    parse_bench_output,
    run_count,
    step_bytes,
)
from bench.report import SystemInfo, anchor_ratio, group_table, tables
from bench.suite import parse_args, parse_size
from bench.systems.devcluster import metric_samples

# --- qemu-img bench's report (qemu 7.2, as Debian 12 ships it) ------------------------------

READ_QD32 = (
    "Sending 5000 read requests, 4096 bytes each, 32 in parallel "
    "(starting at offset 0, step size 428969984)\n"
    "Run completed in 0.724 seconds.\n"
)
FLUSHED = """\
Sending 500 write requests, 4096 bytes each, 1 in parallel (starting at offset 0, step size 4096)
Sending flush every 1 requests
Run completed in 9.390 seconds.
"""
GLUSTER_NOISE = """\
[2026-12-06 02:35:11.167844 +0000] I [io-stats.c:3701:ios_sample_buf_size_configure] 0-gv0: x
Sending 2000 write requests, 1048576 bytes each, 8 in parallel (starting at offset 4096, \
step size 1048576)
Run completed in 12 seconds.
[2026-12-06 02:35:21.188532 +0000] I [io-stats.c:4033:fini] 0-gv0: io-stats translator unloaded
"""


@pytest.mark.parametrize(
    ("text", "requests", "write", "block", "depth", "offset", "step", "flush", "seconds"),
    [
        (READ_QD32, 5000, False, 4096, 32, 0, 428969984, 0, 0.724),
        (FLUSHED, 500, True, 4096, 1, 0, 4096, 1, 9.390),
        (GLUSTER_NOISE, 2000, True, 1 << 20, 8, 4096, 1 << 20, 0, 12.0),
    ],
)
def test_bench_output_is_parsed(
    text: str,
    requests: int,
    write: bool,
    block: int,
    depth: int,
    offset: int,
    step: int,
    flush: int,
    seconds: float,
) -> None:
    out = parse_bench_output(text)
    assert (out.requests, out.write, out.block, out.depth) == (requests, write, block, depth)
    assert (out.offset, out.step, out.flush_interval, out.seconds) == (offset, step, flush, seconds)


@pytest.mark.parametrize(
    "text",
    [
        "qemu-img: Could not open 'driver=iscsi,...': iSCSI login failed\n",
        READ_QD32.splitlines()[0],  # killed before the end
        "Run completed in 1.0 seconds.\n",
        "",
    ],
)
def test_a_report_without_both_lines_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a qemu-img bench report"):
        parse_bench_output(text)


def test_bench_argv_is_what_the_job_says() -> None:
    argv = bench_argv(JOB_BY_NAME["qd1wf"], "driver=iscsi,x=y", 1 << 30, 1234)
    assert argv[:4] == ["stdbuf", "-oL", "qemu-img", "bench"]
    assert argv[-1] == "driver=iscsi,x=y"
    assert argv[argv.index("-c") : argv.index("-c") + 2] == ["-c", "1234"]
    assert argv[argv.index("-d") : argv.index("-d") + 2] == ["-d", "1"]
    assert "-w" in argv and "--flush-interval=1" in argv
    assert "--pattern=165" in argv  # never zeros: a target could shortcut them
    reads = bench_argv(JOB_BY_NAME["sr1m"], "o", 1 << 30, 10)
    assert "-w" not in reads and not any(a.startswith("--flush") for a in reads)
    assert reads[reads.index("-S") + 1] == str(1 << 20)  # sequential: one block per step


# --- the random stride ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [64 << 20, 128 << 20, 512 << 20, 1 << 30, 3 * (1 << 20) + 4096 * 7]
)
def test_random_stride_visits_every_block_once_per_cycle_and_far_apart(size: int) -> None:
    job = JOB_BY_NAME["rr4k"]
    step = step_bytes(job, size)
    blocks = size // job.block
    assert step % job.block == 0
    stride = step // job.block
    offsets = [(i * stride) % blocks for i in range(blocks)]
    assert len(set(offsets)) == blocks  # a full cycle: qemu-img wraps modulo the image size
    gaps = [min(abs(a - b), blocks - abs(a - b)) for a, b in itertools.pairwise(offsets)]
    assert min(gaps) > blocks // 4  # consecutive requests never near each other


def test_sequential_jobs_step_one_block() -> None:
    for job in JOBS:
        if not job.random:
            assert step_bytes(job, 1 << 30) == job.block


# --- calibration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "seconds", "target", "expected"),
    [
        (100, 0.0, 0.3, 1600),  # too fast to time: the largest step
        (100, 0.001, 0.3, 1600),  # capped at 16x
        (100, 0.1, 0.3, 450),  # aims at 1.5x the target
        (100, 0.25, 0.3, 200),  # at least 2x
    ],
)
def test_next_probe_count(count: int, seconds: float, target: float, expected: int) -> None:
    assert next_probe_count(count, seconds, target) == expected


@pytest.mark.parametrize(
    ("count", "seconds", "wanted", "depth", "expected"),
    [
        (1000, 0.5, 8, 32, 16000),  # the rate times the wanted length
        (10, 1.0, 1, 32, 64),  # never less than two full queues
        (1, 0.0, 1, 1, 1_000_000),  # an instant probe does not divide by zero
    ],
)
def test_run_count(count: int, seconds: float, wanted: float, depth: int, expected: int) -> None:
    assert run_count(count, seconds, wanted, depth) == expected


# --- CPU accounting ---------------------------------------------------------------------------


def stat_line(pid: int, comm: str, utime: int, stime: int, starttime: int) -> str:
    # fields 3..22 of proc(5): state .. starttime; utime/stime are 14/15, starttime 22
    rest = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 6 + [str(starttime)]
    return f"{pid} ({comm}) {' '.join(rest)} 0 0 0\n"


@pytest.mark.parametrize("comm", ["tgtd", "glusterfsd", "a b) (c", "x)"])
def test_proc_stat_fields_are_counted_from_the_last_parenthesis(comm: str) -> None:
    stat = parse_proc_stat(stat_line(4242, comm, utime=150, stime=50, starttime=777))
    assert (stat.pid, stat.utime, stat.stime, stat.starttime) == (4242, 150, 50, 777)
    assert stat.key == (4242, 777)


def test_parse_proc_stat_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        parse_proc_stat("4242 no parenthesis here")


def test_cpu_delta_sums_processes_and_follows_identity() -> None:
    before = {(10, 1): 100, (11, 1): 50, (12, 5): 7}
    after = {
        (10, 1): 100 + 3 * CLK_TCK,  # 3 s more
        (11, 1): 50 + CLK_TCK // 2,  # 0.5 s more
        (12, 9): CLK_TCK,  # pid 12 reused by a new process: counts from zero (1 s)
        (13, 4): CLK_TCK,  # started during the job: 1 s
    }
    d = delta(before, after)
    assert d.seconds == pytest.approx(5.5)
    assert d.processes == 4
    assert d.vanished == 1  # the old pid 12
    assert d.per_io_us(11_000) == pytest.approx(500.0)
    assert d.percent(11.0) == pytest.approx(50.0)
    assert math.isnan(CpuDelta(1.0, 1, 0).per_io_us(0))


def test_sample_reads_this_process_and_skips_the_dead() -> None:
    import os

    got = sample([os.getpid(), 2**22 + 12345])  # above pid_max: never a process
    assert len(got) == 1
    ((pid, start), ticks) = next(iter(got.items()))
    assert pid == os.getpid() and start > 0 and ticks >= 0


# --- iscsi-load's line, /metrics --------------------------------------------------------------


def test_load_output_is_parsed() -> None:
    text = (
        "some warning\n"
        '{"ios": 1200, "errors": 0, "seconds": 2.001, "iops": 599.7, "mbps": 2.46, '
        '"lat_p50_us": 1500.5, "lat_p99_us": 4100.0, "lat_avg_us": 1667.2}\n'
    )
    r = parse_load_output(text)
    assert (r.ios, r.errors, r.p50_us, r.p99_us, r.mean_us) == (1200, 0, 1500.5, 4100.0, 1667.2)
    with pytest.raises(ValueError, match="no result line"):
        parse_load_output("iscsi_load: login failed: ...\n")


METRICS = """\
# HELP lunastor_rebuild_bytes_total Bytes copied to joining members
# TYPE lunastor_rebuild_bytes_total counter
lunastor_rebuild_bytes_total 1.048576e+06
lunastor_rebuild_bytes_created 1.7e+09
lunastor_writes_sequenced_total{volume="a"} 300.0
lunastor_writes_sequenced_total{volume="b"} 100.0
lunastor_writes_sequenced_local_total{volume="a"} 290.0
"""


def test_metric_samples() -> None:
    assert metric_samples(METRICS, "lunastor_rebuild_bytes_total") == {"": 1048576.0}
    assert sum(metric_samples(METRICS, "lunastor_writes_sequenced_total").values()) == 400.0
    assert metric_samples(METRICS, "lunastor_rebuild_bytes") == {}  # a prefix is not a match
    assert metric_samples(METRICS, "absent_total") == {}


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (locality.Counters(100, 50), locality.Counters(300, 240), 0.95),
        (None, locality.Counters(300, 240), None),  # the metric is absent: n/a
        (locality.Counters(100, 50), locality.Counters(100, 50), None),  # no write sequenced
    ],
)
def test_locality_share(
    before: locality.Counters | None, after: locality.Counters | None, expected: float | None
) -> None:
    got = locality.share(before, after)
    assert got == (None if expected is None else pytest.approx(expected))


# --- ratios, tables, goals --------------------------------------------------------------------


def result(job: str, ios: int, seconds: float, cpu: float, block: int = 4096) -> JobResult:
    return JobResult(
        job=job,
        ios=ios,
        block=block,
        seconds=seconds,
        server_cpu=CpuDelta(cpu, 1, 0),
        other_cpu=None,
        client_cpu_seconds=0.5,
        client_wall_seconds=2.0,
    )


RESULTS = {
    "tgt": {
        "rr4k": result("rr4k", 20000, 1.0, 0.2),
        "sr1m": result("sr1m", 1000, 1.0, 0.5, 1 << 20),
    },
    "gluster": {"rr4k": result("rr4k", 10000, 1.0, 0.4), "sr1m": "sr1m: qemu-img bench failed"},
    "standalone": {"rr4k": result("rr4k", 50000, 1.0, 0.3)},
}
SYSTEMS = [
    SystemInfo("tgt", "tgt, 1 copy (C)", "tgtd"),
    SystemInfo("gluster", "GlusterFS replica 3 (gfapi)", "bricks"),
    SystemInfo("standalone", "lunastor standalone (1 file)", "it"),
]


def test_anchor_ratios() -> None:
    rr4k, sr1m = JOB_BY_NAME["rr4k"], JOB_BY_NAME["sr1m"]
    assert anchor_ratio(rr4k, RESULTS, "standalone", "tgt") == pytest.approx(2.5)
    assert anchor_ratio(rr4k, RESULTS, "standalone", "gluster") == pytest.approx(5.0)
    assert anchor_ratio(sr1m, RESULTS, "standalone", "tgt") is None  # not run
    assert anchor_ratio(sr1m, RESULTS, "tgt", "gluster") is None  # the anchor failed


def test_group_table() -> None:
    table = group_table([JOB_BY_NAME["rr4k"]], SYSTEMS, RESULTS)
    assert table[0] == "4 KiB random, QD32 (IOPS; more is better)"
    assert len(table) == 5  # title, header, a row per system
    tgt, gluster, standalone = table[2:]
    assert "tgt, 1 copy (C)" in tgt and "GlusterFS" in gluster and "standalone" in standalone
    assert "20,000" in tgt and "1.00x" in tgt and "2.00x" in tgt and "10.0 us" in tgt
    assert "50,000" in standalone and "2.50x" in standalone and "5.00x" in standalone
    assert "6.0 us" in standalone and "25%" in standalone
    failed = group_table([JOB_BY_NAME["sr1m"]], SYSTEMS, RESULTS)
    assert "failed: sr1m: qemu-img bench failed" in failed[3]
    assert "n/a" in failed[2]  # tgt against a failed Gluster line


def test_tables_show_a_legend_and_a_table_per_group_and_nothing_without_results() -> None:
    out = tables([JOB_BY_NAME["rr4k"], JOB_BY_NAME["sr1m"]], SYSTEMS, RESULTS)
    assert out[0].startswith("systems") and "tgtd" in out[1]
    assert sum(1 for line in out if "more is better" in line) == 2
    assert tables(list(JOBS), SYSTEMS, {}) == []


def test_goals_are_checked_and_shown_only_for_what_ran() -> None:
    measures = goals.job_measures([JOB_BY_NAME["rr4k"]], RESULTS)
    assert measures["standalone.rr4k.x_tgt"] == pytest.approx(2.5)
    assert measures["standalone.rr4k.cpu_us"] == pytest.approx(6.0)
    ran = {"tgt.rr4k", "gluster.rr4k", "standalone.rr4k", "noisy"}
    shown = goals.lines(measures, ran)
    text = "\n".join(shown)
    assert "standalone 4 KiB random read >= 2x tgt" in text
    assert "standalone CPU per 4 KiB read <= 12 us" in text
    assert "1 MiB" not in text  # not run
    assert "r3" not in text
    rows = {line.split("#13")[1].strip().split("  ")[0]: line for line in shown if "#13" in line}
    assert rows["standalone 4 KiB random read >= 2x tgt"].endswith(" met")
    assert rows["standalone CPU per 4 KiB read <= 12 us"].endswith(" met")
    noisy = [line for line in shown if "#18" in line]
    assert len(noisy) == 1 and noisy[0].endswith("n/a")  # no limited run measured here
    assert goals.Goal(1, "x", "a.b.value", "<=", 10).check({"a.b.value": 11}) is False
    assert goals.Goal(1, "x", "a.b.x_gluster", ">=", 1).needs() == {"a.b", "gluster.b"}
    assert goals.Goal(1, "x", "rebuild.x_disk", ">=", 1).needs() == {"rebuild"}


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"), [("512MiB", 512 << 20), ("1g", 1 << 30), ("64M", 64 << 20), ("4096", 4096)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_bad_arguments_are_refused_with_the_name(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--only", "tgt,ceph"], "unknown part(s) ceph"),
        (["--jobs", "rr4k,rr8k"], "unknown job(s) rr8k"),
        (["--size", "lots"], "not a size"),
        (["--size", "1000000"], "a whole number of MiB"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    args = parse_args(["--only", "tgt, standalone", "--jobs", "qd1wf"])
    assert args.parts == ["tgt", "standalone"]
    assert [j.name for j in args.job_list] == ["qd1wf"]
    assert "r3-vip" not in parse_args([]).parts


# --- the client runner -------------------------------------------------------------------------


def test_run_child_reports_the_child_cpu_and_output() -> None:
    busy = (
        "import time\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\nprint('done')"
    )
    run = run_child([sys.executable, "-c", busy], timeout=60)
    assert run.returncode == 0 and run.output.strip() == "done" and not run.timed_out
    assert run.cpu_seconds >= 0.25  # the child's own rusage, not ours
    assert run.wall_seconds >= run.cpu_seconds * 0.5


def test_run_child_stops_a_client_whose_report_is_complete() -> None:
    # the client exits by itself at about the moment its report is read: the kill must not
    # race the wait for it (it did once: a poll inside Popen.kill reaped it first)
    for _ in range(50):
        run = run_child(["sh", "-c", "echo 'Run completed in 0.1 seconds.'"], 10, " seconds.")
        assert run.returncode == 0 and "Run completed" in run.output
    slow = run_child(["sh", "-c", "echo 'done in 1 seconds.'; sleep 30"], 60, " seconds.")
    assert slow.returncode == 0 and slow.wall_seconds < 20 and not slow.timed_out


def test_run_child_kills_at_the_timeout() -> None:
    run = run_child(["sleep", "30"], timeout=0.5)
    assert run.timed_out and run.returncode == -9 and run.wall_seconds < 20


def test_the_workers_line_compares_two_workers_with_one() -> None:
    from bench.workers import Pair, Setup, lines, measures

    def setup(workers: int, write: float, read: float) -> Setup:
        pairs = {
            "rw4k": Pair("rw4k", int(write * 10), 10.0, (write / 2, write / 2), 0.9, 90.0),
            "rr4k": Pair("rr4k", int(read * 10), 10.0, (read / 2, read / 2), 1.0, 30.0),
        }
        local = [40000.0] if workers == 1 else [14990.0, 15000.0]  # reads: read * 10
        return Setup(workers, pairs, [2.0] if workers == 1 else [1.0, 1.0], local)

    setups = [setup(1, 1000, 4000), setup(2, 1700, 3000)]
    assert measures(setups) == {"workers.rw4k.x_one": 1.7, "workers.rr4k.x_one": 0.75}
    text = "\n".join(lines(setups, 256 << 20))
    assert "1.70x 1 worker" in text and "0.75x 1 worker" in text
    assert "logins per worker: 1/1" in text
    assert "own replicas: 40000 (local hops at most 0)" in text
    assert "own replicas: 14990/15000 (local hops at most 10)" in text
    assert "bench/iscsi_light.c" in text
    assert measures(setups[:1]) == {}  # nothing to compare with


def test_the_workers_rounds_combine_into_one_pair() -> None:
    from bench.workers import Pair, combined

    first = Pair("rr4k", 1000, 1.0, (500.0, 500.0), 0.2, 30.0, 0.1, 9.0)
    second = Pair("rr4k", 3000, 1.0, (1500.0, 1500.0), 0.4, 20.0, 0.3, 12.0)
    both = combined([first, second])
    assert both.iops == 2000.0 and both.client_iops == (1000.0, 1000.0)
    assert both.server_us_per_io == 22.5  # weighted by requests
    assert both.server_cores == pytest.approx(0.3) and both.client_cores == pytest.approx(0.2)
    assert both.load == 12.0
