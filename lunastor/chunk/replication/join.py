"""The primary adds a member to an extent while writes continue, or retires one
(docs/datapath.md, "Joining a member"): re-replication, catch-up and drain all come down to
these two.

A join of target T, by the extent's primary P:

1. Under the extent lock, T's replica is created (or an old one reset) as *syncing* at the
   current generation with `applied = last seq`; from then on P forwards every ordered write
   to T as well (dataserver.py: `PrimaryExtent.joining`). T serves no reads while syncing; a
   failure of T only ends the join.
2. P compares its checksum array with T's and copies the differing 4 KiB blocks in runs of up
   to 1 MiB (`RUN`, `WINDOW` in flight), each run an *ordered operation*: under the extent
   lock P reads the run from its own replica and gives it the next seq; T applies it as an
   ordered `copy` with that seq, the other members as an `advance` (no payload). On T a copy
   therefore lands exactly between the writes before and after it: it never overwrites a
   newer write, and a sub-block write to a not-yet-copied block is made right by the later
   copy.
3. Under the lock, with every forward settled, the arrays are compared again (so a finished
   copy is verified before it joins); if equal, T is flushed and `{gen + 1, replicas + [T]}`
   committed by a transaction on the entry's mod_revision, then `gen + 1` pushed to everyone
   (T: state current). Otherwise another pass copies what still differs.

Because the diff is by checksums, a repeated or resumed join copies only what still differs,
and a returning replica copies only the regions that changed while it was away (catch-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from prometheus_client import Counter

from lunastor.chunk.replication.node import DataNode, PrimaryExtent, StaleMap, Unavailable
from lunastor.chunk.store import BLOCK_SIZE, CHECKSUM_SIZE, ReplicaState
from lunastor.chunk.wire.messages import (
    Advance,
    Copy,
    Create,
    Delete,
    Flush,
    GetState,
    Request,
    Response,
    SetGen,
    Status,
)
from lunastor.chunk.wire.peer import PeerError
from lunastor.common.events import EVENTS

log = logging.getLogger(__name__)

BYTES_COPIED = Counter(
    "lunastor_rebuild_bytes_total", "Bytes copied to joining members (rebuild, catch-up)"
)
EXTENTS_REBUILT = Counter(
    "lunastor_rebuild_extents_total", "Members joined to an extent after a rebuild or catch-up"
)
JOINS_ABORTED = Counter(
    "lunastor_rebuild_joins_aborted_total", "Joins given up (target failed, extent changed)"
)
MEMBERS_RETIRED = Counter(
    "lunastor_rebuild_members_retired_total", "Live members removed (drain, over-replication)"
)

# Bytes per ordered copy, and copies in flight per join. 4 MiB runs (fewer messages, header
# updates and `advance`s per byte) were tried A/B against 1 MiB ones and not kept: no faster
# and no less CPU per MB at the target on a loaded machine, while the source holds the
# extent's lock 4x as long per run (docs/datapath.md, "Rebuild, catch-up and drain").
RUN = 1 << 20
WINDOW = 4
MAX_PASSES = 5  # copy passes before a join that never converges is given up


class JoinAborted(Exception):
    """The join ended without adding the member (it failed, or the extent changed)."""


@dataclass(frozen=True, slots=True)
class JoinResult:
    target: str
    bytes_copied: int
    passes: int
    gen: int  # the generation that includes the target
    seconds: float = 0.0


class Throttle:
    """A token bucket shared by a server's joins: at most `rate` bytes/s, bursts of 1 s."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


def differing_runs(ours: bytes, theirs: bytes, run: int = RUN) -> list[tuple[int, int]]:
    """(byte offset, length) runs of blocks whose checksums differ, at most `run` bytes each."""
    per = run // BLOCK_SIZE
    n = len(ours) // CHECKSUM_SIZE
    if len(theirs) != len(ours):
        theirs = theirs[: len(ours)].ljust(len(ours), b"\0")
    a, b = memoryview(ours).cast("Q"), memoryview(theirs).cast("Q")
    runs: list[list[int]] = []
    for i in range(n):
        if a[i] == b[i]:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] < per:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(first * BLOCK_SIZE, count * BLOCK_SIZE) for first, count in runs]


async def _call(node: DataNode, member: str, build: Callable[[int], Request]) -> Response:
    try:
        return await node.replicas.call(member, build)
    except PeerError as exc:
        raise JoinAborted(f"{member}: {exc}") from None


async def _prepare(node: DataNode, pe: PrimaryExtent, target: str) -> None:
    """Under the lock: T's replica syncing at our generation, applied = our last seq."""
    vol, idx = pe.volume, pe.index
    st = await _call(node, target, partial(GetState, volume=vol, extent=idx))
    if st.status is Status.NOT_FOUND:
        made = await _call(
            node, target, partial(Create, volume=vol, extent=idx, gen=pe.gen, state=1)
        )
        if made.status not in (Status.OK, Status.EXISTS):
            raise JoinAborted(f"{target} cannot create a replica: {made.status}")
    elif not st.ok:
        raise JoinAborted(f"{target}: {st.status}")
    elif st.fields["gen"] > pe.gen:
        raise JoinAborted(f"{target} holds generation {st.fields['gen']} > {pe.gen}")
    reset = await _call(
        node,
        target,
        partial(
            SetGen,
            volume=vol,
            extent=idx,
            gen=pe.gen,
            applied_seq=pe.next_seq - 1,
            state=int(ReplicaState.SYNCING),
        ),
    )
    if not reset.ok:
        raise JoinAborted(f"{target} refused to sync: {reset.status}")


async def _their_sums(node: DataNode, pe: PrimaryExtent, target: str) -> bytes:
    st = await _call(
        node, target, partial(GetState, volume=pe.volume, extent=pe.index, with_checksums=True)
    )
    if not st.ok:
        raise JoinAborted(f"{target}: {st.status}")
    return st.payload


def _check(node: DataNode, pe: PrimaryExtent, target: str, gen: int) -> None:
    if pe.joining != target or pe.gen != gen or not node.current(pe):
        raise JoinAborted(f"join of {target} to {pe.volume}/{pe.index} ended")


async def _copy_run(
    node: DataNode, pe: PrimaryExtent, target: str, gen: int, offset: int, length: int
) -> asyncio.Task[int]:
    """One ordered copy: seq assigned and forwards started under the lock; settled later."""
    async with pe.lock:
        _check(node, pe, target, gen)
        seq = pe.next_seq
        data, sums = await pe.replica.read_for_copy(offset, length)
        await pe.replica.advance(seq=seq, gen=gen)
        pe.next_seq += 1
        vol, idx = pe.volume, pe.index
        sends = node._forward(
            pe,
            partial(Advance, volume=vol, extent=idx, gen=gen, seq=seq),
            seq,
            joining_build=partial(
                Copy,
                volume=vol,
                extent=idx,
                gen=gen,
                offset=offset,
                length=length,
                data=data,
                checksums=sums,
                seq=seq,
            ),
        )
    return asyncio.ensure_future(node._settle(pe, seq, sends, quorum=False))


async def _copy(
    node: DataNode,
    pe: PrimaryExtent,
    target: str,
    gen: int,
    runs: list[tuple[int, int]],
    throttle: Throttle,
) -> int:
    pending: deque[asyncio.Task[int]] = deque()
    copied = 0
    try:
        for offset, length in runs:
            await throttle.take(length)
            pending.append(await _copy_run(node, pe, target, gen, offset, length))
            copied += length
            while len(pending) >= WINDOW:
                await pending.popleft()
        while pending:
            await pending.popleft()
    finally:
        for task in pending:
            task.cancel()
        BYTES_COPIED.inc(copied)
    return copied


async def join_member(
    node: DataNode, volume: str, index: int, target: str, throttle: Throttle, *, run: int = RUN
) -> JoinResult:
    """Add `target` to the extent we are primary of, while writes continue (`run`: bytes per
    ordered copy, a multiple of 4 KiB)."""
    pe = await node.lead(volume, index)
    if target in pe.members:
        return JoinResult(target, 0, 0, pe.gen)
    started = time.monotonic()
    copied = 0
    try:
        async with pe.lock:
            if pe.joining is not None:
                raise JoinAborted(f"{pe.joining} is joining {volume}/{index} already")
            gen = pe.gen
            await _prepare(node, pe, target)
            pe.joining = target
        for passes in range(1, MAX_PASSES + 1):
            ours = await pe.replica.checksums()
            runs = differing_runs(ours, await _their_sums(node, pe, target), run)
            copied += await _copy(node, pe, target, gen, runs, throttle)
            again: list[str] = []
            async with pe.lock:
                _check(node, pe, target, gen)
                await pe.idle.wait()  # every forward settled: T applied every seq so far
                _check(node, pe, target, gen)
                ours = await pe.replica.checksums()
                if differing_runs(ours, await _their_sums(node, pe, target)):
                    continue
                again = await _commit(node, pe, target)
            EXTENTS_REBUILT.inc()
            EVENTS.emit("replica_added", f"{volume}/{index}", f"{target}, {copied} bytes copied")
            if again:  # committed: a member that refused the new generation goes
                with contextlib.suppress(Unavailable, StaleMap):
                    await node.remove_members(pe, again, f"it did not take gen {pe.gen}")
            took = time.monotonic() - started
            log.warning(
                "extent %s/%d: %s joined (gen %d), %d bytes copied in %d passes, %.2f s",
                volume,
                index,
                target,
                pe.gen,
                copied,
                passes,
                took,
            )
            return JoinResult(target, copied, passes, pe.gen, took)
        raise JoinAborted(f"{target} still differs after {MAX_PASSES} passes")
    except BaseException:
        if pe.joining == target:
            pe.joining = None
        JOINS_ABORTED.inc()
        raise


async def _commit(node: DataNode, pe: PrimaryExtent, target: str) -> list[str]:
    """Under the lock, all forwards settled: T becomes a member with gen + 1.

    Returns the members that refused the new generation (to be removed after the lock)."""
    flush = partial(Flush, volume=pe.volume, extent=pe.index, gen=pe.gen)
    flushed = await _call(node, target, flush)
    if not flushed.ok:
        raise JoinAborted(f"{target} could not flush: {flushed.status}")
    entry = await node.emap.fresh(pe.volume, pe.index)
    if entry is None or entry.record.gen != pe.gen or entry.record.replicas != pe.members:
        raise JoinAborted(f"extent {pe.volume}/{pe.index} changed during the join")
    members = [*pe.members, target]
    new = dataclasses.replace(entry.record, gen=pe.gen + 1, replicas=members, converging=False)
    committed = await node.emap.replace(entry, new)
    if committed is None:
        raise JoinAborted(f"extent {pe.volume}/{pe.index} changed during the join")
    pe.gen, pe.members, pe.joining = new.gen, members, None
    await pe.replica.set_generation(new.gen)

    async def adopt(member: str) -> bool:
        state = int(ReplicaState.CURRENT) if member == target else None
        build = partial(SetGen, volume=pe.volume, extent=pe.index, gen=new.gen, state=state)
        try:
            return (await node.replicas.call(member, build)).ok
        except PeerError:
            return False

    # all at once: each is a header sync on its member, and nothing orders them (we hold the
    # lock: no write of ours reaches a member between its old and its new generation)
    adopted = await asyncio.gather(*(adopt(m) for m in members[1:]))
    return [m for m, ok in zip(members[1:], adopted, strict=True) if not ok]


async def retire_member(node: DataNode, volume: str, index: int, member: str, why: str) -> int:
    """Remove a live member (a drain, or more replicas than wanted); returns the new gen.

    A secondary is removed like a failed one and its replica file deleted. The primary itself
    hands the extent over: under the lock, with every forward settled (so the others have
    applied every seq), it pushes `gen + 1` to the others, commits `{gen + 1, others}`, and
    deletes its own replica."""
    pe = await node.lead(volume, index)
    if member not in pe.members:
        return pe.gen
    if member != node.node_id:
        await node.remove_members(pe, [member], why)
        await _delete(node, member, volume, index, pe.gen)
        MEMBERS_RETIRED.inc()
        return pe.gen
    async with pe.lock:
        await pe.idle.wait()
        entry = await node.emap.fresh(volume, index)
        if entry is None or entry.record.gen != pe.gen or entry.record.replicas != pe.members:
            raise JoinAborted(f"extent {volume}/{index} changed during the handover")
        rest = pe.members[1:]
        if not rest:
            raise JoinAborted(f"extent {volume}/{index} has no other member to hand over to")
        gen = pe.gen + 1
        # The others adopt gen + 1 before the commit: the new primary's first forward must
        # not find a member still at the old generation. We hold the lock, so no write of
        # ours can meet them in between.
        for m in rest:
            resp = await _call(node, m, partial(SetGen, volume=volume, extent=index, gen=gen))
            if not resp.ok:
                raise JoinAborted(f"{m} refused gen {gen}: {resp.status}")
        new = dataclasses.replace(entry.record, gen=gen, replicas=rest, converging=False)
        committed = await node.emap.replace(entry, new)
        if committed is None:
            raise JoinAborted(f"extent {volume}/{index} changed during the handover")
        pe.gen, pe.members = gen, []
        node.forget(pe)
    await _delete(node, node.node_id, volume, index, gen)
    MEMBERS_RETIRED.inc()
    log.warning("extent %s/%d: handed over to %s (gen %d)", volume, index, rest[0], gen)
    return gen


async def _delete(node: DataNode, member: str, volume: str, index: int, gen: int) -> None:
    """Best effort: a removed member's replica file goes (garbage otherwise)."""
    try:
        await node.replicas.call(member, partial(Delete, volume=volume, extent=index, gen=gen))
    except PeerError as exc:
        log.info("could not delete %s/%d on %s: %s", volume, index, member, exc)
