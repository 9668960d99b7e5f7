"""Shared fixtures: one real etcd per test session, a key prefix per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.support.etcd import EtcdServer

# Property tests check behaviour, not speed: on a loaded 2-core CI machine one example can
# take longer than Hypothesis' 200 ms default deadline, which is then reported as a failure.
settings.register_profile("lunastor", deadline=None)
settings.load_profile("lunastor")


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """A real etcd shared by the session; tests isolate themselves with `etcd_prefix`.

    Tests that stop or restart etcd must start their own `EtcdServer` instead.
    """
    server = EtcdServer(host=os.environ.get("LUNASTOR_TEST_ETCD_HOST", "127.0.0.1")).start()
    yield server
    server.cleanup()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses."""
    return f"/lunastor-test/{uuid.uuid4().hex[:12]}/"
