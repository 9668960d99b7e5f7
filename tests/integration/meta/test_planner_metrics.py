"""The planner leader's passes in meta's metrics, against a real etcd: each planner's pass is
timed by name (`lunastor_planner_pass_seconds`), a pass that ends on an etcd error is counted
(`lunastor_planner_pass_failures_total`), and it does not keep the planners after it from
running."""

from __future__ import annotations

from prometheus_client import REGISTRY

from lunastor.common.etcd import EtcdUnavailable
from lunastor.common.presence import Presence
from lunastor.common.records import Keys
from lunastor.meta.gc import GcPlanner
from lunastor.meta.planners import PlannerLeader
from tests.integration.meta.conftest import Api


class Unreachable:
    """A planner whose every pass meets an etcd that does not answer."""

    name = "unreachable"

    async def run_once(self) -> None:
        raise EtcdUnavailable("etcd 127.0.0.1:9: connection refused")


def sample(name: str, planner: str) -> float:
    return REGISTRY.get_sample_value(name, {"planner": planner}) or 0.0


async def test_each_pass_is_timed_by_planner_and_an_etcd_failure_is_counted(api: Api) -> None:
    presence = Presence(api.etcd, api.etcd.config, Keys.LIVE_META + "m1", 5.0, lambda _: b"{}")
    leader = PlannerLeader(api.etcd, presence, "m1", [Unreachable(), GcPlanner(api.etcd)], 5.0)
    count, total = "lunastor_planner_pass_seconds_count", "lunastor_planner_pass_seconds_sum"
    failures = "lunastor_planner_pass_failures_total"
    before = {p: (sample(count, p), sample(total, p)) for p in ("unreachable", "gc")}
    failed_before = sample(failures, "unreachable"), sample(failures, "gc")

    await leader.run_once()
    await leader.run_once()

    for planner in ("unreachable", "gc"):
        passes, seconds = before[planner]
        assert sample(count, planner) == passes + 2
        assert sample(total, planner) > seconds
    assert (sample(failures, "unreachable"), sample(failures, "gc")) == (
        failed_before[0] + 2,
        failed_before[1],
    )
