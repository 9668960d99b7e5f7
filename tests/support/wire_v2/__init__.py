"""Version 2 of the data protocol's sans-IO code, exactly as it was before version 3 (commit
ffabcbb): binary frames, per-write answers, no cumulative acks. The old peer of the version-3
negotiation tests (tests/unit/chunk/test_wire_acks.py).
Regenerate: `git show ffabcbb:lunastor/chunk/wire/messages.py`, and session.py with its import
of messages pointed here. Not to be edited."""
