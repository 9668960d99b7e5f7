"""`python -m tests.kernel [SCENARIO ...]`: run the kernel-initiator scenarios, one line each.

Exit status 0 when every scenario passed, 1 when one failed, 77 when guests cannot boot here
(no QEMU or no kernel). Run directories (serial.log, target.log, results/) are kept under
--build-dir/runs/SCENARIO.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.kernel.cluster_scenarios import NAMES as CLUSTER_NAMES
from tests.kernel.cluster_scenarios import run_cluster_scenarios
from tests.kernel.csi_scenarios import CSI_NAMES, run_csi_scenarios
from tests.kernel.harness import boot_files, unavailable
from tests.kernel.lio import LIO_SCENARIOS
from tests.kernel.scenarios import SCENARIOS, ScenarioResult, run_scenario

SKIP = 77


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.kernel", description=__doc__)
    known = [*SCENARIOS, *CLUSTER_NAMES, *CSI_NAMES, *LIO_SCENARIOS]
    ap.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=", ".join(known))
    ap.add_argument("--build-dir", type=Path, default=Path("build/kernel-guest"))
    ap.add_argument(
        "--log-level",
        default="INFO",
        help="the target's (default INFO; DEBUG traces every PDU and turns the fast path off)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="print guest results on failure")
    args = ap.parse_args(argv)
    names = args.scenarios or known
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(known)}")
    reason = unavailable()
    if reason is not None:
        print(f"SKIP kernel-initiator scenarios: {reason}")
        return SKIP
    started = time.monotonic()
    boot = boot_files(args.build_dir)
    print(f"kernel {boot.version}, boot files ready in {time.monotonic() - started:.1f}s")
    failed = 0

    def report(result: ScenarioResult) -> None:
        nonlocal failed
        print(result.line(), flush=True)
        if not result.passed:
            failed += 1
            print(f"  run directory: {result.workdir}")
            if args.verbose and result.guest is not None:
                print(result.guest.serial_tail())

    for name in names:
        if name in SCENARIOS:
            runs = args.build_dir / "runs" / name
            report(run_scenario(SCENARIOS[name](), boot, runs, args.log_level))
    cluster = [n for n in names if n in CLUSTER_NAMES]
    if cluster:
        runs = args.build_dir / "runs" / "cluster"
        for result in run_cluster_scenarios(cluster, boot, runs, args.build_dir):
            report(result)
    csi = [n for n in names if n in CSI_NAMES]
    if csi:  # its own dev cluster and boot: the node plugin in the guest
        for result in run_csi_scenarios(csi, boot, args.build_dir / "runs" / "csi", args.build_dir):
            report(result)
    for name in names:
        if name in LIO_SCENARIOS:  # its own dev cluster in the guest's namespace
            report(LIO_SCENARIOS[name](boot, args.build_dir / "runs" / name))
    print(f"kernel scenarios took {time.monotonic() - started:.0f}s")
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
