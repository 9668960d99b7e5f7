"""Version 1 of the data protocol's sans-IO code, exactly as released (commit c6e693c):
the old peer of the version-negotiation tests (tests/unit/chunk/test_wire_v2.py).
Regenerate: `git show c6e693c:lunastor/chunk/wire/messages.py`, and session.py with its import
of messages pointed here. Not to be edited."""
