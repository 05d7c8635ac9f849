"""The Dagster UI in headless Chromium: the lineage shows the seven assets, the train_and_evaluate
job's "Materialize all" launches a run on the tiny profile that succeeds, the Runs page shows it
under its job name and filters it by the profile tag, the run log shows progress lines, the report
table and the loss curve are visible, and the evaluate job launched from its Launchpad with a
config succeeds. Run with `make test-browser`."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lorasum_assets_tests.dagster_processes import end_process_group

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
ASSETS = [
    "raw_dialogsum", "filtered_split", "tokenized_dataset", "lora_adapter", "base_predictions", "tuned_predictions", "bertscore_report",
    "promoted_adapter",
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# Where a table cell holding exactly this text ends, and whether a scrolling or clipping box it
# sits in hides any of it.
FULLY_SHOWN_JS = """(text) => {
  const cell = [...document.querySelectorAll('th, td')].find(e => e.textContent.trim() === text);
  if (!cell) return null;
  const box = cell.getBoundingClientRect();
  let clipped = false;
  for (let a = cell.parentElement; a; a = a.parentElement) {
    if (/(auto|scroll|hidden|clip)/.test(getComputedStyle(a).overflowX)) {
      const outer = a.getBoundingClientRect();
      if (box.right > outer.right + 1 || box.left < outer.left - 1) clipped = true;
    }
  }
  return {right: box.right, viewport: window.innerWidth, clipped};
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def dagster_ui(tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    port = free_port()
    watched = tmp_path / "watched"  # a folder raw_dialogsum would reject: one file, no split in its name or rows
    watched.mkdir()
    (watched / "dialogues.jsonl").write_text('{"id": "a", "dialogue": "#Person1#: Hi.", "summary": "A greeting."}\n')
    env = {**os.environ, "LORASUM_PROFILE": "tiny", "LORASUM_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster"),
           "LORASUM_WATCH_PATH": str(watched)}
    (tmp_path / "dagster").mkdir()
    log = open(tmp_path / "dagster-dev.log", "w")
    # `make ui`'s command. dg dev and its code-server children ignore a plain SIGTERM for a while:
    # run them in a session of their own and end the whole group.
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dg"), "dev", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"dg dev exited: {(tmp_path / 'dagster-dev.log').read_text()[-2000:]}")
                time.sleep(1)
        else:
            pytest.fail("dg dev did not start within 180 s")
        yield url
    finally:
        end_process_group(proc, timeout=10)
        log.close()


def test_lineage_shows_seven_assets_and_materialize_all_succeeds(dagster_ui):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})  # a laptop's browser window
        page.goto(f"{dagster_ui}/asset-groups", wait_until="networkidle")
        skip = page.get_by_role("button", name="Skip")  # "Join the Dagster community" on a first visit
        try:
            skip.wait_for(timeout=8000)
            skip.click()
        except PlaywrightTimeout:
            pass
        # Groups start collapsed; the UI keeps expanded groups in the URL.
        expanded = ",".join(f"global@global:{g}" for g in ("data", "training", "evaluation"))
        page.goto(f"{dagster_ui}/asset-groups/?expanded={urllib.parse.quote(expanded)}", wait_until="networkidle")
        page.wait_for_timeout(2000)
        for asset in ASSETS:
            assert page.get_by_text(asset, exact=True).count() >= 1, f"{asset} not shown in the lineage"
        page.screenshot(path=str(ARTIFACTS / "ui-lineage.png"))

        # The data-change sensor, turned on, reads the watched folder as raw_dialogsum would and says
        # on its tick why it starts no run (the daemon of `dagster dev` ticks it).
        sensor_url = f"{dagster_ui}/locations/lorasum/sensors/retrain_on_data_change"
        page.goto(sensor_url, wait_until="networkidle")
        page.locator("input[type=checkbox]").first.locator("xpath=..").click()  # the switch drawn over the hidden input
        page.wait_for_timeout(1000)
        assert page.locator("input[type=checkbox]").first.is_checked(), "the sensor did not start"

        # Everything runs through the train_and_evaluate job, so its runs carry the job's name.
        page.goto(f"{dagster_ui}/jobs", wait_until="networkidle")
        page.locator("a[href$='/jobs/train_and_evaluate']").first.click()
        page.wait_for_load_state("networkidle")
        page.get_by_role("button", name="Materialize all").click()
        page.wait_for_timeout(2000)
        page.goto(f"{dagster_ui}/runs", wait_until="networkidle")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if page.get_by_text("Success", exact=True).count() or page.get_by_text("Failure", exact=True).count():
                break
            page.wait_for_timeout(2000)
            page.reload(wait_until="networkidle")
        page.screenshot(path=str(ARTIFACTS / "ui-runs.png"))
        assert page.get_by_text("Failure", exact=True).count() == 0, "the run failed"
        assert page.get_by_text("Success", exact=True).count() == 1, "no successful run within 300 s"
        assert page.get_by_text("train_and_evaluate").count() >= 1, "the run is not shown under its job's name"

        # The run's log: model loading, training steps with time left, generation batches.
        page.locator("a[href*='/runs/']").filter(has_text=re.compile(r"^[0-9a-f]{8}$")).first.click()
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(3000)
        log_filter = page.get_by_placeholder(re.compile("filter", re.IGNORECASE)).first
        if log_filter.count():
            log_filter.fill("left")  # the progress lines: "step 7/22 steps, … ~8 s left", generation batches
            page.wait_for_timeout(2000)
        page.screenshot(path=str(ARTIFACTS / "ui-run-log.png"))
        assert page.get_by_text(re.compile(r"step 2\d/22 steps")).count() >= 1, "no training progress line in the run log"

        # The Runs page filters by the tags every run carries.
        tag_filter = urllib.parse.quote("tag:lorasum/profile=tiny")
        page.goto(f"{dagster_ui}/runs?q%5B0%5D={tag_filter}", wait_until="networkidle")
        page.wait_for_timeout(2000)
        page.screenshot(path=str(ARTIFACTS / "ui-runs-by-profile.png"))
        assert page.get_by_text("Success", exact=True).count() == 1, "filtering by lorasum/profile=tiny lost the run"

        # The report: the base-vs-tuned table laid out in the asset's metadata, no extra click.
        page.goto(f"{dagster_ui}/assets/bertscore_report", wait_until="networkidle")
        page.wait_for_timeout(2000)
        page.get_by_placeholder("Filter metadata keys").fill("report")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "ui-report.png"), full_page=True)
        assert page.get_by_text("tuned − base", exact=True).count() == 1, "the report table is not shown, or shown twice"
        for text in ("% diff", "ROUGE-Lsum"):  # the last column's header, and the last row
            box = page.evaluate(FULLY_SHOWN_JS, text)
            assert box and not box["clipped"] and box["right"] <= box["viewport"], f"{text!r} of the report is cut off: {box}"

        page.goto(sensor_url, wait_until="networkidle")
        result = page.locator("button:has-text('0 runs requested'), a:has-text('0 runs requested')")  # a tick's result
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not result.count():
            page.wait_for_timeout(3000)
            page.reload(wait_until="networkidle")
        result.first.click()
        page.wait_for_timeout(2000)
        page.screenshot(path=str(ARTIFACTS / "ui-sensor-skip.png"), full_page=True)
        reason = page.get_by_text(re.compile(r"not retraining: raw_dialogsum would fail .*cannot tell the split"))
        assert reason.count() >= 1, "the sensor's tick does not say why it started no run"

        # The promotion decision and the production adapter, in promoted_adapter's metadata.
        page.goto(f"{dagster_ui}/assets/promoted_adapter", wait_until="networkidle")
        page.wait_for_timeout(2000)
        page.screenshot(path=str(ARTIFACTS / "ui-promotion.png"), full_page=True)
        assert page.get_by_text("production_adapter", exact=True).count() >= 1, "the production adapter is not shown"
        assert page.get_by_text(re.compile(r"^promoted tiny-.*over the base model")).count() >= 1, "the decision's reason is not shown"

        # The training curve of lora_adapter.
        page.goto(f"{dagster_ui}/assets/lora_adapter", wait_until="networkidle")
        page.wait_for_timeout(2000)
        page.get_by_placeholder("Filter metadata keys").fill("loss_curve")
        page.wait_for_timeout(1000)
        show = page.get_by_text("Show Markdown")
        if show.count():
            show.first.click()
            page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "ui-training.png"), full_page=True)
        assert page.locator("img[alt='Training loss']").first.is_visible(), "the loss curve is not visible"

        # Re-score the adapter with the evaluate job, launched from its Launchpad with a config.
        page.goto(f"{dagster_ui}/locations/lorasum/jobs/evaluate/playground", wait_until="networkidle")
        page.wait_for_timeout(2000)
        if skip.count() and skip.is_visible():
            skip.click()
        config = "ops:\n  base_predictions:\n    config:\n      max_new_tokens: 8\n  tuned_predictions:\n    config:\n      max_new_tokens: 8\n"
        page.evaluate("(text) => document.querySelector('.CodeMirror').CodeMirror.setValue(text)", config)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ARTIFACTS / "ui-launchpad-evaluate.png"))
        page.get_by_role("button", name="Launch Run").click()
        page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]+.*"), timeout=60000)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not page.get_by_text(re.compile(r"^(Success|Failure)$")).count():
            page.wait_for_timeout(2000)
        page.screenshot(path=str(ARTIFACTS / "ui-evaluate-run.png"))
        assert page.get_by_text("Success", exact=True).count() >= 1, "the evaluate run did not succeed"
        assert page.get_by_text("evaluate").count() >= 1
        browser.close()
