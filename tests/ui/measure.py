"""Latency of the REST calls the dashboard polls, on a running dev cluster with N volumes:
`python -m tests.ui.measure DIR N` creates N thin 1 GiB volumes (m0..) through the API, then
times 20 calls of each endpoint (docs/dashboard.md has the numbers). Not a test: it prints."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp


async def measure(directory: Path, count: int) -> None:
    state = json.loads((directory / "cluster.json").read_text())
    api = state["api_url"]
    headers = {"Authorization": "Bearer " + state["admin_token"]}
    async with aiohttp.ClientSession(headers=headers) as s:
        slots = asyncio.Semaphore(20)

        async def create(i: int) -> str:
            async with (
                slots,
                s.post(f"{api}/v1/volumes", json={"name": f"m{i}", "size_bytes": 1 << 30}) as r,
            ):
                return str((await r.json())["id"])

        ids = await asyncio.gather(*(create(i) for i in range(count)))
        paths = [
            "/v1/volume-status",
            f"/v1/volumes/{ids[0]}/status",
            f"/v1/volumes/{ids[0]}/metrics",
            "/v1/volumes?limit=1000",
            "/v1/events?limit=100",
        ]
        for path in paths:
            took = []
            for _ in range(20):
                start = time.perf_counter()
                async with s.get(api + path) as r:
                    await r.read()
                    assert r.status == 200, (path, r.status)
                took.append(time.perf_counter() - start)
            name = path.replace(ids[0], "{id}")
            median, worst = statistics.median(took) * 1000, max(took) * 1000
            print(f"{name:32s} median {median:6.1f} ms  max {worst:6.1f} ms  ({count} volumes)")


if __name__ == "__main__":
    asyncio.run(measure(Path(sys.argv[1]), int(sys.argv[2])))
