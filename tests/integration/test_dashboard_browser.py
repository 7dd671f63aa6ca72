"""The dashboard in headless Chromium, against a live service on Ray under load: the page's numbers
are the store's. Screenshots go to tmp/artifacts/test_dashboard_browser/ in the repository."""

from __future__ import annotations

import asyncio
import re
import time
from html.parser import HTMLParser
from typing import Any

import pytest

from scheduler.connection import client_from_url
from scheduler.service.snapshot import state_json, take_snapshot
from scheduler.settings import Settings
from scheduler.store import Store
from tests import browser
from tests.conftest import REPO_ROOT
from tests.integration.observe_helpers import Load, live_config, store_totals

ARTIFACTS = REPO_ROOT / "tmp" / "artifacts" / "test_dashboard_browser"


class Cells(HTMLParser):
    """The text of every element with data-queue and data-field, and of the decision reasons."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self.reasons: list[str] = []
        self._open: list[tuple[str, str] | str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("data-queue") and a.get("data-field") and tag == "td":
            self._open.append((str(a["data-queue"]), str(a["data-field"])))
        elif a.get("data-field") == "reason":
            self._open.append("reason")
        else:
            self._open.append(None)

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if not self._open:
            return
        top = self._open[-1]
        if isinstance(top, tuple):
            self.cells[top] = self.cells.get(top, "") + data
        elif top == "reason":
            self.reasons.append(data)


def _read(settings: Settings) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        url = settings.url()
        assert url is not None
        store = Store(client_from_url(url), settings)
        try:
            return state_json(await take_snapshot(store, live_config(settings)))
        finally:
            await store.close()

    return asyncio.run(read())


def _page(url: str) -> Cells:
    cells = Cells()
    # ?static: the page shows the state it was served with, without polling for a newer one.
    cells.feed(browser.dump_dom(f"{url}/?static=1"))
    return cells


def _int(text: str) -> int:
    assert re.fullmatch(r"\d+", text), text
    return int(text)


@pytest.mark.slow
class TestDashboardInChromium:
    def test_the_page_shows_the_stores_numbers_during_and_after_a_load(
        self, live_service: Any, settings: Settings, request: pytest.FixtureRequest
    ) -> None:
        """During the load, each queue's completions on the page lie between the store's totals
        read before and after the page was served; after it, depth, completions, JCT
        percentiles and SLO attainment equal what the store says, and the controller's decisions
        are listed with their reasons. Screenshots of both moments are saved."""
        browser.chromium()  # installs it if it must, or fails saying why, before the load starts
        url = live_service.metrics_url
        assert url is not None
        out = ARTIFACTS / request.node.name
        with Load(settings, seconds=10.0) as load:
            # Workers load their models first: look once jobs are completing (bounded wait).
            for _ in range(600):
                if not load.thread.is_alive() or all(store_totals(settings).values()):
                    break
                time.sleep(0.1)
            running = load.thread.is_alive()
            before = store_totals(settings)
            during = _page(url)
            after = store_totals(settings)
            browser.screenshot(f"{url}/", out / "during-load.png")
        assert load.error is None, load.error
        assert running, "the load ended before the first jobs completed"
        for name in before:
            shown = _int(during.cells[(name, "completed_total")])
            assert before[name] <= shown <= after[name], (name, before, shown, after)
            assert shown > 0

        state = _read(settings)
        page = _page(url)
        png = browser.screenshot(f"{url}/?static=1", out / "after-load.png")
        assert png.stat().st_size > 10_000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for q in state["queues"]:
            name = q["name"]
            assert _int(page.cells[(name, "depth")]) == q["depth"] == 0
            assert _int(page.cells[(name, "completed_total")]) == q["completed_total"]
            assert q["completed_total"] > 0
            for p in ("p50", "p95", "p99"):
                assert page.cells[(name, f"jct_{p}_s")] == f"{q['jct'][f'{p}_s']:.3f}"
            slo = q["slo"]
            shown = page.cells[(name, "slo_attainment")]
            assert shown == f"{100 * slo['met'] / slo['judged']:.1f}%", (name, slo)
        # The controller's first decision raised both queues to their minimum of one worker.
        assert state["decisions"], "no decision kept"
        assert page.reasons, "no decision reasons on the page"
        assert any("proposal" in r or ":" in r for r in page.reasons)
