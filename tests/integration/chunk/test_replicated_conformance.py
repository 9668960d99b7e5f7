"""libiscsi's conformance suite against a 3-replica volume of a dev cluster, with its two URLs
on two different chunk servers (MultipathIO across access points), compared test by test with
the standalone target run the same way (docs/conformance.md, "The replicated LUN")."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.chunk.test_replicated_cluster import Cluster, _target_url, _wait_lun
from tests.integration.test_iscsi_target import CU_INITIATORS, Target, classify, cunit_verdicts
from tests.support.devcluster import dev_up, lunastor

# Reservations, RESERVE(6), resets, mode parameters and the unit attentions they raise are
# LU state shared by every access point through etcd
# (lunastor/chunk/access/reservations.py), so every
# test classifies as on the standalone target. A difference that comes back must be listed here
# with its reason: test -> (classification on the replicated LUN, why it differs).
KNOWN_DIFFERENCES: dict[str, tuple[str, str]] = {}
# the differences CUnit itself fails (the others are classifier-only)
KNOWN_CUNIT_FAILURES = {t for t, (s, _) in KNOWN_DIFFERENCES.items() if s == "FAILED"}


def suite(*urls: str, log: Path) -> str:
    start = time.monotonic()
    with open(log, "w") as out:
        subprocess.run(
            ["iscsi-test-cu", "-d", "-v", "--test=ALL", *urls],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
            check=False,
        )
    text = log.read_text()
    print(f"iscsi-test-cu --test=ALL on {' '.join(urls)}: {time.monotonic() - start:.0f} s")
    assert "Run Summary" in text, text[-2000:]
    return text


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    state = dev_up(tmp_path / "dev", chunks=3, lease_ttl=2.0)
    try:
        yield Cluster(tmp_path / "dev", state)
    finally:
        lunastor("dev", "down", "--dir", str(tmp_path / "dev"), check=False)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the whole suite twice: 5 min or more on a loaded 2-core machine
def test_libiscsi_conformance_on_a_replicated_volume_matches_the_standalone_target(
    cluster: Cluster, tmp_path: Path
) -> None:
    vol = cluster.create_exported_volume("cu", "256MiB", *CU_INITIATORS)
    first, second = cluster.chunks[:2]
    urls = [_target_url(cluster.portal(c), vol["target_iqn"], vol["lun"]) for c in (first, second)]
    for url in urls:
        for initiator in CU_INITIATORS:
            _wait_lun(url, initiator)
    replicated = suite(*urls, log=tmp_path / "replicated.log")

    (tmp_path / "standalone").mkdir()
    target = Target(tmp_path / "standalone", "--allow", *CU_INITIATORS, size=256 << 20)
    try:
        standalone = suite(target.url(), target.url(), log=tmp_path / "standalone.log")
    finally:
        assert target.stop() == 0, target.log.read_text()

    verdicts = cunit_verdicts(replicated)
    assert len(verdicts) >= 200
    failed = {name for name, ok in verdicts.items() if not ok}
    assert failed <= KNOWN_CUNIT_FAILURES, failed - KNOWN_CUNIT_FAILURES

    ours, theirs = classify(replicated), classify(standalone)
    assert set(ours) == set(theirs)
    expected = {t: KNOWN_DIFFERENCES.get(t, (s, ""))[0] for t, s in theirs.items()}
    differing = {t: (theirs[t], ours[t]) for t in ours if ours[t] != expected[t]}
    # each listed difference must be a real one (or be removed from the list when fixed)
    assert not differing, f"standalone -> replicated classification: {differing}"
    assert all(theirs[t] != s for t, (s, _) in KNOWN_DIFFERENCES.items()), {
        t: theirs[t] for t in KNOWN_DIFFERENCES
    }
