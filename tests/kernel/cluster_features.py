"""Issue 8's scenarios 4 (snapshot after fsfreeze, clone) and 5 (persistent reservations from
two sessions on two chunk servers): one boot of `guest/features.py` against the dev cluster.

They need snapshots/clones in the data path and cluster-wide SCSI reservations, which other
branches build; until those land, these scenarios fail where the feature is missing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lunastor.redirector.choose import ServerChoice, choose_chunk_server
from tests.kernel.cluster import ClusterError, NetCluster
from tests.kernel.cluster_scenarios import FEATURES, HostSide, split_parts
from tests.kernel.harness import Action, BootFiles, Guest, GuestNet
from tests.kernel.initramfs import GUEST_DIR
from tests.kernel.scenarios import MIB, ScenarioResult

NODE = "iqn.2025-01.io.lunastor.test:feature-node"
PR_A = "iqn.2025-01.io.lunastor.test:pr-a"


def pr_partner(target: str, servers: list[str]) -> str:
    """An initiator name the redirector sends to another chunk server than PR_A's."""
    choices = [ServerChoice(s, "up") for s in servers]
    first = choose_chunk_server(PR_A, target, choices)
    for n in range(1000):
        name = f"iqn.2025-01.io.lunastor.test:pr-b{n}"
        if choose_chunk_server(name, target, choices) != first:
            return name
    raise ClusterError(f"no initiator name lands elsewhere than {first}")


def run_features(
    wanted: list[str], cluster: NetCluster, net: GuestNet, boot: BootFiles, workdir: Path
) -> Iterator[ScenarioResult]:
    host = HostSide()
    with host.timed(FEATURES[0], "restart-chunk-servers"):
        for name in cluster.chunk_names():  # the failover scenario killed one
            with contextlib.suppress(ClusterError):
                cluster.control("start", name)
    snap = cluster.create_volume("kernel-snap", 128 * MIB, 3, [NODE])
    pr = cluster.create_volume("kernel-pr", 64 * MIB, 3, [])
    live = [i["id"] for i in cluster.api("GET", "/v1/chunks")["items"] if i["state"] == "up"]
    pr_b = pr_partner(pr["target_iqn"], live)
    for initiator in (PR_A, pr_b):
        cluster.publish(pr["id"], initiator)

    def snapshot(_: str) -> str:
        with host.timed(FEATURES[0], "rest-snapshot-clone"):
            body = {"name": "kernel-snap-1", "volume_id": snap["id"]}
            taken = cluster.api("POST", "/v1/snapshots", body, ok=(201,))
            clone = cluster.api(
                "POST",
                "/v1/volumes",
                {
                    "name": "kernel-clone",
                    "size_bytes": snap["size_bytes"],
                    "source": {"snapshot_id": taken["id"]},
                },
                ok=(201,),
            )
            cluster.publish(clone["id"], NODE)
        return json.dumps({"iqn": clone["target_iqn"], "lun": clone["lun"]})

    actions: dict[str, Action] = {"snapshot": snapshot}
    params: dict[str, Any] = {
        "portal": cluster.portal,
        "route": cluster.route,
        "host": net.host_addr,
        "node": NODE,
        "snap_iqn": snap["target_iqn"],
        "snap_lun": snap["lun"],
        "files": {"small.bin": 4096, "odd.bin": MIB + 4321, "big.bin": 8 * MIB},
        "pr_iqn": pr["target_iqn"],
        "pr_lun": pr["lun"],
        "pr_a": PR_A,
        "pr_b": pr_b,
    }
    result = Guest(net, workdir, boot).run(GUEST_DIR / "features.py", params, 600, actions)
    yield from split_parts(result, FEATURES, wanted, host, workdir)
