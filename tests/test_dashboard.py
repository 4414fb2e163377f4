"""The dashboard in a real browser (Debian's Chromium, driven by Playwright) on a real
store: it shows the numbers the store holds, as kface counts computes them; the camera
filter and the CSV; a token when served beyond 127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import REPO, chromium_and_playwright, run_kface, stop_process
from test_shop_day import DAY, TZ, synthetic_store


def _dashboard(*args: str, log) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "cli", "dashboard", "--port", "0",
                             *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            cwd=REPO, start_new_session=True)
    end = time.time() + 60
    while time.time() < end:
        found = re.search(r"on (http://\S+) ", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_process(proc)
    raise AssertionError(log.read_text())


def test_the_dashboard_shows_what_the_store_holds(tmp_path):
    chromium, sync_playwright = chromium_and_playwright()
    db = tmp_path / "shop.db"
    synthetic_store(db)
    res = run_kface("counts", "--store", str(db), "--day", DAY, "--tz", TZ, "--json")
    assert res.returncode == 0, res.stderr
    expected = {p["label"]: p for p in json.loads(res.stdout)["periods"]}
    proc, url = _dashboard("--store", str(db), "--tz", TZ, log=tmp_path / "dash.log")
    try:
        assert url.startswith("http://127.0.0.1:") and "token" not in url
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--no-sandbox", "--proxy-server=direct://"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route(re.compile(r"^(?!http://127\.0\.0\.1).*"),  # offline: nothing else
                       lambda route: route.abort())
            page.goto(f"{url}?day={DAY}")
            page.wait_for_selector("#status[data-loaded='1']", timeout=60_000)
            row = page.locator("tr[data-period='2026-12-07T10:00']")
            for cell in ("20s_F", "30s_M", "50s_F"):
                c = expected["2026-12-07T10:00"]["joint"][cell]
                shown = row.locator(f"td[data-cell='{cell}']").inner_text()
                assert shown == f"{c['estimate']:.1f} ({c['low']:.0f}–{c['high']:.0f})"
            assert row.locator("td.visitors").inner_text() == "40"
            assert "thin" in page.locator("tr[data-period='2026-12-07T14:00']"
                                          ).get_attribute("class")
            assert "down" in page.locator("tr[data-period='2026-12-07T12:00']"
                                          ).get_attribute("class")
            assert page.locator("#totals .card .n").first.inner_text() == "43"
            assert page.locator("#chart svg rect").count() > 4
            page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
            page.select_option("#camera", "b")
            page.wait_for_function(
                "document.querySelector('#totals .card .n').textContent === '3'")
            href = page.locator("#csv").get_attribute("href")
            assert "camera=b" in href
            csv = page.request.get(url + href).text()
            assert csv.splitlines()[-1].startswith("total,3,")
            browser.close()
    finally:
        stop_process(proc)


def test_beyond_127_0_0_1_the_dashboard_needs_its_token(tmp_path):
    db = tmp_path / "shop.db"
    synthetic_store(db)
    proc, url = _dashboard("--store", str(db), "--host", "0.0.0.0", log=tmp_path / "d.log")
    try:
        token = url.split("token=")[1]
        port = url.split(":")[2].split("/")[0]
        api = f"http://127.0.0.1:{port}/api/counts?day={DAY}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(api, timeout=30)
        assert refused.value.code == 401
        with urllib.request.urlopen(f"{api}&token={token}", timeout=60) as answer:
            assert json.loads(answer.read())["total"]["visitors"] >= 0
    finally:
        stop_process(proc)
