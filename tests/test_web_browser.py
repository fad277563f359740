"""The dashboard in a real browser (Debian's chromium, headless, driven by Selenium through chromedriver).

It opens the dashboard of a running job and checks what a person would look for: the job graph with
one box per vertex, record counts that grow between two reads, and the memory page with the region's
real free-block counts per order. It saves a screenshot of each page (``SHMFLOW_TEST_SCREENSHOTS``, default
the test's tmp_path). ``.ci/run`` installs chromium, chromedriver and selenium when they are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from test_web import start_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs chromium and chromedriver (apt-get install -y chromium chromium-driver; .ci/run does)",
                allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402 - after the skip above


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1440,1150", "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def running_job():
    yield from start_job(count=60 * 4000)  # a minute at most: the test cancels it when done


def _shots(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("SHMFLOW_TEST_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_the_dashboard_shows_the_live_job_graph_and_the_region(browser, running_job, tmp_path):
    url, jid = running_job.url, running_job.job_id()
    browser.get(url + f"#job/{jid}")
    # The page rebuilds its DOM every second: each read is one script, so it sees one consistent page.
    def page(script: str) -> Any:
        return browser.execute_script(script)

    wait_until(lambda: page("return document.querySelectorAll('#job-graph g.vertex').length") == 2, timeout=30,
               msg="the job graph's two vertices")
    names = page("return [...document.querySelectorAll('#job-graph g.vertex title')].map(e => e.textContent)")
    assert names[0].startswith("events -> double") and names[1].startswith("sum")

    def source_records() -> int:  # the source's two subtasks come first
        return int(page("return [...document.querySelectorAll(\"#job-subtasks td[data-metric='read-records']\")]"
                        ".slice(0, 2).reduce((a, c) => a + Number(c.textContent.replace(/,/g, '')), 0)"))

    wait_until(lambda: source_records() > 0, timeout=30, msg="records on the page")
    first = source_records()
    wait_until(lambda: source_records() > first, timeout=30, msg="the record counts to grow without a reload")
    wait_until(lambda: "k/s" in page("return document.getElementById('chart-legend').textContent"), timeout=30,
               msg="the throughput chart's legend")
    shots = _shots(tmp_path)
    browser.save_screenshot(str(shots / "dashboard-job.png"))

    browser.get(url + "#memory")
    wait_until(lambda: page("return document.querySelectorAll('.arena[data-worker]').length") == 2, timeout=30,
               msg="both workers' arenas")
    def memory() -> Any:
        with urllib.request.urlopen(url + "memory", timeout=10) as response:
            return json.loads(response.read())

    def expected() -> dict[str, int]:
        return {str(o["order"]): o["blocks"] for o in memory()["workers"][0]["arena"]["free_by_order"]}

    assert expected(), "an arena with free blocks"

    def shown() -> dict[str, int]:
        return dict(page("return [...document.querySelectorAll(\".arena[data-worker='0'] .orderchart .col\")]"
                         ".map(c => [c.dataset.order, Number(c.querySelector('.cnt').textContent)])"))

    # The arena changes as operators take pages: wait until the page shows what /memory says.
    wait_until(lambda: shown() == expected() != {}, timeout=30, msg="the arena's free blocks per order on the page")
    owners = page("return document.querySelector(\".arena[data-worker='0']\").innerText")
    assert "network" in owners and "Managed memory per operator" in owners
    region_blocks = page("return document.querySelectorAll('#region-bar .blk').length")
    region = memory()["region"]
    assert region_blocks == len(region["blocks"]) + len(region["free"])
    browser.save_screenshot(str(shots / "dashboard-memory.png"))

    browser.get(url + "#overview")
    wait_until(lambda: "worker 1" in page("return document.getElementById('ov-workers').textContent"), timeout=30,
               msg="the workers on the overview")
    browser.save_screenshot(str(shots / "dashboard-overview.png"))
    running_job.cluster.coordinator.request_cancel(jid)  # done: end the job rather than wait for it
    running_job.join()
