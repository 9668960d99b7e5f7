"""The redirector's chunk-server choice: rendezvous hashing, pinned and measured."""

from __future__ import annotations

import math
import random
from collections import Counter
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunastor.redirector.choose import ChoiceError, ServerChoice, choose_chunk_server

TARGET = "iqn.2026-01.io.lunastor:vol-1"
INITIATORS = [f"iqn.2026-01.org.example:host-{i}" for i in range(10_000)]


def servers(n: int, prefix: str = "cs-") -> list[ServerChoice]:
    return [ServerChoice(f"{prefix}{i}", "up") for i in range(n)]


def choices(group: list[ServerChoice], target: str = TARGET) -> list[str | None]:
    return _choices(tuple(group), target)


@cache
def _choices(group: tuple[ServerChoice, ...], target: str) -> list[str | None]:
    return [choose_chunk_server(i, target, group) for i in INITIATORS]


# --- golden vectors: any change to these results must be deliberate ---------------------------

GOLDEN_SERVERS = [
    ServerChoice("cs-1", "up"),
    ServerChoice("cs-2", "up"),
    ServerChoice("cs-3", "up"),
    ServerChoice("cs-4", "up", weight=2.0),
    ServerChoice("cs-5", "draining"),
]


@pytest.mark.parametrize(
    ("initiator", "target", "chosen"),
    [
        ("iqn.1993-08.org.debian:01:abc", "iqn.2026-01.io.lunastor:vol-1", "cs-3"),
        ("iqn.1993-08.org.debian:01:abc", "iqn.2026-01.io.lunastor:vol-2", "cs-1"),
        ("iqn.2004-10.com.ubuntu:01:host7", "iqn.2026-01.io.lunastor:vol-1", "cs-4"),
        ("iqn.2008-11.org.linux-kvm:qemu-1", "iqn.2026-01.io.lunastor:vol-1", "cs-3"),
        ("iqn.2008-11.org.linux-kvm:qemu-2", "iqn.2026-01.io.lunastor:vol-1", "cs-4"),
        ("", "", "cs-4"),
    ],
)
def test_golden_choices(initiator: str, target: str, chosen: str) -> None:
    assert choose_chunk_server(initiator, target, GOLDEN_SERVERS) == chosen


def test_golden_distribution() -> None:
    group = servers(5)
    got = Counter(choose_chunk_server(i, TARGET, group) for i in INITIATORS[:1000])
    assert got == {"cs-0": 203, "cs-1": 210, "cs-2": 190, "cs-3": 195, "cs-4": 202}


# --- balance and movement ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5, 10])
def test_balance_within_ten_percent(n: int) -> None:
    counts = Counter(choices(servers(n)))
    fair = len(INITIATORS) / n
    assert len(counts) == n
    assert all(abs(c - fair) / fair <= 0.10 for c in counts.values()), counts


@pytest.mark.parametrize(
    ("n", "how"), [(3, "removed"), (5, "removed"), (10, "removed"), (5, "draining"), (5, "down")]
)
def test_leaving_server_moves_only_its_initiators(n: int, how: str) -> None:
    group = servers(n)
    before = choices(group)
    gone = group[1]
    if how == "removed":
        smaller = [s for s in group if s is not gone]
    else:
        smaller = [ServerChoice(s.id, how) if s is gone else s for s in group]
    after = choices(smaller)
    for old, new in zip(before, after, strict=True):
        if old == gone.id:
            assert new != gone.id and new is not None
        else:
            assert new == old


@pytest.mark.parametrize(("n", "expected_moves"), [(3, 2502), (5, 1654), (10, 889)])
def test_added_server_takes_about_its_share_and_only_moves_to_it(
    n: int, expected_moves: int
) -> None:
    group = servers(n)
    before = choices(group)
    after = choices([*group, ServerChoice("cs-new", "up")])
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert all(new == "cs-new" for _, new in moved)
    # measured, pinned; about 10,000 / (n + 1): 2500, 1667, 909
    assert len(moved) == expected_moves
    assert abs(len(moved) - len(INITIATORS) / (n + 1)) <= 0.1 * len(INITIATORS) / (n + 1)


def test_weight_scales_the_share() -> None:
    group = [ServerChoice(f"cs-{i}", "up", weight=2.0 if i % 2 else 1.0) for i in range(6)]
    counts = Counter(choices(group))
    for s in group:
        fair = len(INITIATORS) * s.weight / 9
        assert abs(counts[s.id] - fair) / fair <= 0.10, counts


def test_targets_spread_one_initiator() -> None:
    # one host logging in to many targets is spread too, not pinned to one server
    group = servers(5)
    counts = Counter(
        choose_chunk_server(INITIATORS[0], f"iqn.2026-01.io.lunastor:vol-{t}", group)
        for t in range(5000)
    )
    assert all(abs(c - 1000) / 1000 <= 0.10 for c in counts.values()), counts


def test_any_iterable_of_servers() -> None:
    group = servers(4)
    assert choose_chunk_server("i", "t", iter(group)) == choose_chunk_server("i", "t", group)  # type: ignore[arg-type]


def test_order_of_servers_does_not_matter() -> None:
    group = servers(7)
    shuffled = list(group)
    random.Random(3).shuffle(shuffled)
    assert choices(shuffled)[:2000] == choices(group)[:2000]


# --- nothing eligible, bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "group",
    [
        [],
        [ServerChoice("a", "draining")],
        [ServerChoice("a", "down"), ServerChoice("b", "draining")],
    ],
)
def test_none_when_no_server_is_up(group: list[ServerChoice]) -> None:
    assert choose_chunk_server(INITIATORS[0], TARGET, group) is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ServerChoice("", "up"), "non-empty"),
        (lambda: ServerChoice("a", "healthy"), "state"),
        (lambda: ServerChoice("a", "up", weight=0), "weight"),
        (lambda: ServerChoice("a", "up", weight=-1.0), "weight"),
        (lambda: ServerChoice("a", "up", weight=math.nan), "weight"),
        (lambda: ServerChoice("a", "up", weight=math.inf), "weight"),
        (lambda: ServerChoice("a", "up", weight=True), "weight"),
        (lambda: choose_chunk_server("i", "t", [ServerChoice("a", "up")] * 2), "more than once"),
        (lambda: choose_chunk_server(b"i", "t", servers(2)), "strings"),  # type: ignore[arg-type]
        (lambda: choose_chunk_server("i", "t", ["a"]), "ServerChoice"),  # type: ignore[list-item]
    ],
)
def test_errors(make, message: str) -> None:
    with pytest.raises(ChoiceError, match=message):
        make()


# --- properties --------------------------------------------------------------------------------

server_lists = st.lists(
    st.builds(
        ServerChoice,
        id=st.text(min_size=1, max_size=6),
        state=st.sampled_from(["up", "draining", "down"]),
        weight=st.sampled_from([0.5, 1.0, 3.0]),
    ),
    max_size=8,
    unique_by=lambda s: s.id,
)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20), server_lists)
def test_property_choice_is_up_and_stable(
    initiator: str, target: str, group: list[ServerChoice]
) -> None:
    chosen = choose_chunk_server(initiator, target, group)
    up = [s.id for s in group if s.state == "up"]
    if not up:
        assert chosen is None
        return
    assert chosen in up
    # removing any other server, or adding a non-up one, never changes the choice
    for other in group:
        if other.id != chosen:
            rest = [s for s in group if s is not other]
            assert choose_chunk_server(initiator, target, rest) == chosen
    extra = ServerChoice("\x00extra", "draining")
    assert choose_chunk_server(initiator, target, [*group, extra]) == chosen
