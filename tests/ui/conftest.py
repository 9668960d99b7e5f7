"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against a real dev
cluster: every daemon a process, every page fetched and rendered as an operator's would be.

Screenshots go to `test-artifacts/ui/` (gitignored). Short repair timings (replace_after,
repair and planner intervals, a 1 MiB extent and a 1 MiB/s rebuild rate) make a rebuild take
seconds and move in visible steps, as in tests/integration/chunk/test_rebuild_cluster.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.support.devcluster import dev_up, lunastor

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
READER_TOKEN = "reader-token-for-the-dashboard-tests"
REPAIR_SETTINGS = {
    "LUNASTOR_AUTH__READER_TOKENS": READER_TOKEN,
    "LUNASTOR_EXTENT_SIZE": str(1 << 20),
    "LUNASTOR_REBUILD_RATE": str(1 << 20),
    "LUNASTOR_REBUILD_CONCURRENCY": "1",
    "LUNASTOR_REPLACE_AFTER": "8",
    "LUNASTOR_REPAIR_INTERVAL": "0.5",
    "LUNASTOR_PLANNER_INTERVAL": "0.5",
}
WIDE = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@dataclass
class Cluster:
    dir: Path
    state: dict[str, Any]

    @property
    def api(self) -> str:
        return str(self.state["api_url"])

    @property
    def admin_token(self) -> str:
        return str(self.state["admin_token"])

    def cli(self, *args: str) -> Any:
        return json.loads(lunastor(*args, "--json", "--dir", str(self.dir)).stdout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("ui") / "dev"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in REPAIR_SETTINGS.items():
            mp.setenv(key, value)
        state = dev_up(directory, chunks=4, lease_ttl=2.0)
    try:
        yield Cluster(directory, state)
    finally:
        lunastor("dev", "down", "--dir", str(directory), check=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (scripts/setup.sh installs Debian's package)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@dataclass
class Tab:
    """One browser tab on the dashboard, signed in, collecting what the console reports."""

    page: Page
    api: str
    errors: list[str] = field(default_factory=list)

    def go(self, hash_path: str) -> None:
        self.page.goto(f"{self.api}/ui/#/{hash_path}")
        self.page.wait_for_selector(".page")

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def open_tab(
    browser: Browser, cluster: Cluster, token: str, viewport: dict[str, int] = WIDE
) -> Tab:
    page = browser.new_page(viewport=viewport)  # type: ignore[arg-type]
    tab = Tab(page, cluster.api)

    def console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            tab.errors.append(f"console: {msg.text} ({msg.location.get('url', '')})")

    page.on("console", console)
    page.on("pageerror", lambda exc: tab.errors.append(f"page error: {exc}"))
    page.goto(f"{cluster.api}/ui/")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#who:not([hidden])")
    return tab
