"""`/dashboard` and its data under load, and `/docs`, in a real headless browser with no network but the server.

The browser is the system's chromium driven by Playwright (Playwright's own browser download cannot run
here); without it the browser tests skip and say why. Screenshots go to the test's tmp dir and, when
TOKENMILL_SCREENSHOTS names a folder, there too.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import TinyServer
from tokenmill.api.dashboard import histogram_quantile

CLIENTS = 3  # background streaming clients keeping the server under load
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_histogram_quantile_interpolates_within_a_bucket_as_prometheus_does() -> None:
    buckets = [(0.1, 2.0), (0.2, 6.0), (0.4, 8.0), (math.inf, 10.0)]
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.05)  # rank 1 of 2 in [0, 0.1]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.175)  # rank 5: 3 of 4 into [0.1, 0.2]
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.99, buckets) == 0.4  # in the +Inf bucket: the last finite bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None


class Load:
    """Streaming clients sending requests one after another until stopped."""

    def __init__(self, url: str, clients: int):
        self.stopping = threading.Event()
        self.streamed = 0
        self.threads = [threading.Thread(target=self._client, args=(url, i), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self, url: str, index: int) -> None:
        # A shared prefix, so the prefix cache has something to hit.
        body = {"inputs": f"w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w{20 + index}",
                "parameters": {"max_new_tokens": 48}}
        while not self.stopping.is_set():
            with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as response:
                for _ in response.iter_lines():
                    self.streamed += 1

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)


@pytest.fixture(scope="module")
def loaded_server():
    server = TinyServer(max_concurrent_requests=16)
    load = Load(server.url, CLIENTS)
    try:
        yield server
    finally:
        load.stop()
        server.stop()


def _data(url: str) -> dict:
    return httpx.get(f"{url}/dashboard/data", timeout=10).json()


def test_dashboard_data_follows_the_in_process_engine_under_load(loaded_server) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(_data(loaded_server.url)["points"]) < 3:
        time.sleep(0.3)
    data = _data(loaded_server.url)
    points = data["points"]
    assert data["model"] == "tiny-llama" and len(points) >= 3
    assert [p["t"] for p in points] == sorted(p["t"] for p in points)
    latest = points[-1]
    assert latest["output_tokens_per_s"] > 0
    assert 0 < latest["ttft_s"]["p50"] <= latest["ttft_s"]["p90"] <= latest["ttft_s"]["p99"]
    assert 0 < latest["inter_token_s"]["p50"] <= latest["inter_token_s"]["p99"]
    # The clients' requests run in step and may all have just finished: some point shows them running.
    assert all(0 <= p["kv_cache_usage"] <= 1 for p in points) and any(p["kv_cache_usage"] > 0 for p in points)
    assert any(p["running"] > 0 for p in points)
    assert 0 < latest["prefix_cache_hit_rate"] <= 1
    (replica,) = data["replicas"]
    assert replica["address"] == "in-process" and replica["healthy"]
    # In flight at some moment under load (one snapshot may fall between the clients' rounds, as CI saw).
    while time.monotonic() < deadline + 15 and replica["in_flight"] < 1:
        time.sleep(0.05)
        (replica,) = _data(loaded_server.url)["replicas"]
    assert replica["in_flight"] >= 1
    assert set(latest["load"]) == {"in-process"} and any(p["load"]["in-process"] > 0 for p in points)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `apt-get install chromium` (.ci/run installs it where apt works)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, loaded_server):
    """A page whose requests may reach the server only: a CDN dependency fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    blocked: list[str] = []

    def only_the_server(route) -> None:
        if route.request.url.startswith(loaded_server.url + "/"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    page = context.new_page()
    page.blocked = blocked
    yield page
    context.close()


@pytest.fixture
def screenshot(tmp_path):
    def save(page, name: str) -> None:
        folders = [tmp_path] + ([Path(os.environ["TOKENMILL_SCREENSHOTS"])]
                                if os.environ.get("TOKENMILL_SCREENSHOTS") else [])
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=folder / f"{name}.png", full_page=True)
            print(f"screenshot: {folder / f'{name}.png'}")
    return save


# Each tile's figure and detail, and how many values and painted pixels its plot has.
READ_TILES = """() => [...document.querySelectorAll('.tile')].map(tile => {
    const canvas = tile.querySelector('canvas');
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let painted = 0;
    for (let i = 3; i < pixels.length; i += 4) painted += pixels[i] > 0;
    return {id: tile.dataset.tile, value: tile.querySelector('.value').textContent,
            detail: tile.querySelector('.detail').textContent, points: Number(canvas.dataset.points || 0), painted};
})"""


def test_dashboard_draws_moving_plots_under_load(page, loaded_server, screenshot) -> None:
    page.goto(f"{loaded_server.url}/dashboard")
    assert page.blocked == [], "the page needs other hosts than the server"
    page.wait_for_function("() => [...document.querySelectorAll('canvas')].every(c => Number(c.dataset.points) > 2)",
                           timeout=60_000)
    first = {tile["id"]: tile for tile in page.evaluate(READ_TILES)}
    # Two more polls: every series has grown by two points.
    page.wait_for_function(f"() => Number(document.getElementById('plot-running').dataset.points) >= "
                           f"{first['running']['points'] + 2}", timeout=60_000)
    second = {tile["id"]: tile for tile in page.evaluate(READ_TILES)}
    screenshot(page, "dashboard")
    assert set(first) == {"running", "waiting", "kv_cache", "prefix_cache", "tokens", "ttft", "itl", "load"}
    for tile in second.values():
        assert tile["points"] > first[tile["id"]]["points"] and tile["painted"] > 0, tile
    assert second["tokens"]["value"] != first["tokens"]["value"]
    assert "p99" in second["ttft"]["detail"] and second["ttft"]["detail"] != first["ttft"]["detail"]
    assert page.locator("#replicas tbody tr").count() == 1
    assert page.locator("#replicas .healthy").count() == 1
    assert page.blocked == []


def test_docs_render_swagger_ui_without_network(page, loaded_server, screenshot) -> None:
    page.goto(f"{loaded_server.url}/docs")  # returns once the page's scripts loaded or failed
    assert page.blocked == [], "the page needs other hosts than the server"
    page.wait_for_selector(".swagger-ui .opblock", timeout=60_000)
    assert "tokenmill" in page.locator(".swagger-ui .info .title").inner_text()
    operations = page.locator(".swagger-ui .opblock-summary-path").all_inner_texts()
    assert {"/generate", "/v1/chat/completions", "/metrics"} <= {path.strip() for path in operations}
    screenshot(page, "docs")
    assert page.blocked == []


def test_redoc_script_is_served_by_the_server(loaded_server) -> None:
    """ReDoc is not driven in the browser (a few seconds more): its page must name a script the server has."""
    page = httpx.get(f"{loaded_server.url}/redoc", timeout=10).text
    script = page.split('<script src="', 1)[1].split('"', 1)[0]
    assert script.startswith("/") and "redoc" in script
    answer = httpx.get(f"{loaded_server.url}{script}", timeout=10)
    assert answer.status_code == 200 and "Redoc" in answer.text[:2000]
