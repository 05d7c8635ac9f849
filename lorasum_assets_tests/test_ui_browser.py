"""The README's "UI in five steps", walked in headless Chromium as a person would, at 1440 and at
1280 px wide, in the default view (navigation shown, the asset pages' right-hand panel open):

1. Lineage, ⚙ → Expand all groups: the eight assets.
2. Jobs → train_and_evaluate → Materialize all; Runs → the run: it succeeds, and its log has the
   progress lines and the report as plain text (no backslash-escaped markdown).
3. Catalog → bertscore_report: every metric's table whole, each cell on one line, and the plot inline.
4. Catalog → promoted_adapter: the decision's table whole.
5. Jobs → evaluate → Materialize all ▾ → Open launchpad: the adapter_id field is there to edit, and
   Materialize launches a run that succeeds.

Then every asset page's metadata, at both widths, must fit without a sideways scroll. Each step
leaves a screenshot in test-artifacts/ (docs/ui.md shows them). The data-change sensor,
turned on, says on its tick why it starts no run. Run with `make test-browser`."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
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
METRIC_TABLES = ["BERTScore P", "BERTScore R", "BERTScore F1", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"]
WIDTHS = (1440, 1280)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# The asset page's metadata table (Dagster's Key | Timestamp | Value), how wide its scrolling box is
# and how wide its content, the cells that end right of that box, and the cells of the tables
# nested in it whose text takes more than one line.
METADATA_FIT_JS = """() => {
  const table = [...document.querySelectorAll('table')].find(t => t.rows.length && t.rows[0].innerText.trim().startsWith('Key'));
  if (!table) return null;
  const box = table.parentElement;
  const right = Math.min(box.getBoundingClientRect().right, window.innerWidth);
  const cut = [...table.querySelectorAll('td, th')].filter(c => c.getBoundingClientRect().right > right + 1)
    .map(c => c.innerText.trim().slice(0, 40));
  const wrapped = [...table.querySelectorAll(':scope table td, :scope table th')].filter(c => {
    const range = document.createRange();
    range.selectNodeContents(c);
    return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size > 1;
  }).map(c => c.innerText.trim());
  const keys = [...table.rows].slice(1).map(r => r.cells[0] && r.cells[0].innerText.trim());
  const nested = table.querySelectorAll(':scope table').length;
  return {scrollWidth: box.scrollWidth, clientWidth: box.clientWidth, cut, wrapped, keys, nested};
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


class Walk:
    """One browser window of a given width, following the README's words."""

    def __init__(self, page, url: str, width: int):
        self.page, self.url, self.width = page, url, width

    def shot(self, name: str, full_page: bool = False) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"ui-{name}-{self.width}.png"), full_page=full_page)

    def settle(self, ms: int = 1500) -> None:
        self.page.wait_for_load_state("networkidle")
        self.page.wait_for_timeout(ms)

    def nav(self, label: str) -> None:
        """A link of the left-hand navigation."""
        self.page.locator("nav a, a").filter(has_text=re.compile(f"^{re.escape(label)}$")).first.click()
        self.settle()

    def open_link(self, href_end: str) -> None:
        self.page.locator(f"a[href$='{href_end}']").first.click()
        self.settle()

    def click_icon(self, icon: str) -> None:
        """An icon button (Dagster draws icons as role=img elements named by aria-label)."""
        centre = self.page.evaluate(
            """(icon) => { const e = [...document.querySelectorAll('[role=img]')].reverse().find(e => e.getAttribute('aria-label') === icon
               && e.getBoundingClientRect().width > 0);
               if (!e) return null; const b = e.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; }""",
            icon,
        )
        assert centre, f"no {icon} button on {self.page.url}"
        self.page.mouse.click(*centre)
        self.page.wait_for_timeout(800)

    def newest_run(self) -> tuple[str, str]:
        """Runs page: the newest run's id and its row's text."""
        return tuple(self.page.evaluate(
            """() => { const isRun = a => /^[0-9a-f]{8}$/.test(a.innerText.trim());
               const link = [...document.querySelectorAll('a[href*="/runs/"]')].find(isRun);
               if (!link) return ['', ''];
               let row = link;  // the row: the largest box around the link holding no other run's link
               while (row.parentElement && [...row.parentElement.querySelectorAll('a[href*="/runs/"]')].filter(isRun).length === 1)
                 row = row.parentElement;
               return [link.innerText.trim(), row.innerText]; }"""
        ))

    def launched_run_outcome(self, before: str, timeout_s: float) -> str:
        """Runs page: the status of the run launched after ``before`` (the then newest run's id),
        once it has ended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run_id, row = self.newest_run()
            if run_id and run_id != before:
                for outcome in ("Success", "Failure", "Canceled"):
                    if re.search(rf"\b{outcome}\b", row):
                        return outcome
            self.page.wait_for_timeout(2000)
            self.page.reload(wait_until="networkidle")
        return "no new run ended"

    def metadata_fit(self) -> dict:
        self.page.get_by_text("Metadata", exact=True).first.scroll_into_view_if_needed()
        fit = self.page.evaluate(METADATA_FIT_JS)
        assert fit, f"no metadata table on {self.page.url}"
        return fit

    def assert_whole(self, fit: dict, what: str) -> None:
        assert fit["scrollWidth"] <= fit["clientWidth"], (
            f"{what} at {self.width} px: the metadata is {fit['scrollWidth']} px wide in a {fit['clientWidth']} px box")
        assert not fit["cut"], f"{what} at {self.width} px: cut off on the right: {fit['cut']}"
        assert not fit["wrapped"], f"{what} at {self.width} px: cells on more than one line: {fit['wrapped']}"


def step_1_lineage(walk: Walk) -> None:
    walk.nav("Lineage")
    walk.click_icon("settings")  # ⚙ at the bottom right of the graph
    walk.page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
    walk.page.keyboard.press("Escape")
    walk.settle(2000)
    for asset in ASSETS:
        assert walk.page.get_by_text(asset, exact=True).count() >= 1, f"{asset} not shown in the lineage"
    walk.shot("1-lineage")


def step_2_train_and_evaluate(walk: Walk) -> None:
    walk.nav("Runs")
    before, _ = walk.newest_run()
    walk.nav("Jobs")
    walk.open_link("/jobs/train_and_evaluate")
    walk.page.get_by_role("button", name="Materialize all").click()
    walk.page.wait_for_timeout(2000)
    walk.nav("Runs")
    outcome = walk.launched_run_outcome(before, timeout_s=300)
    walk.shot("2-runs")
    assert outcome == "Success", f"the train_and_evaluate run ended: {outcome}"
    assert walk.page.get_by_text("train_and_evaluate").count() >= 1, "the run is not shown under its job's name"

    # The run's log: training steps with the time left, then the report as an aligned text table.
    walk.page.locator("a[href*='/runs/']").filter(has_text=re.compile(r"^[0-9a-f]{8}$")).first.click()
    walk.settle(3000)
    log_filter = walk.page.get_by_placeholder(re.compile("filter", re.IGNORECASE)).first
    log_filter.fill("left")
    walk.page.wait_for_timeout(2000)
    assert walk.page.get_by_text(re.compile(r"step 2\d/22 steps, .* s left")).count() >= 1, "no training progress line in the run log"
    log_filter.fill("base vs tuned")
    walk.page.wait_for_timeout(2000)
    walk.shot("2-run-log")
    message = walk.page.get_by_text(re.compile(r"^base vs tuned on \d+ test dialogues")).first.inner_text()
    assert re.search(r"\nBERTScore F1 +\d\.\d{3} +\d\.\d{3} +[+-]\d\.\d{3} \[", message), message
    assert not re.search(r"\\[\[\]|*_`+\-#]", message), f"backslash-escaped markdown in the run log: {message!r}"


def step_3_report(walk: Walk) -> None:
    walk.nav("Catalog")
    walk.open_link("/assets/bertscore_report")
    fit = walk.metadata_fit()
    walk.shot("3-report")
    assert [k for k in fit["keys"] if k in METRIC_TABLES] == METRIC_TABLES and fit["nested"] == len(METRIC_TABLES), fit
    walk.assert_whole(fit, "bertscore_report's tables")
    plot = walk.page.locator("img[alt='BERTScore F1 change per dialogue']")
    plot.scroll_into_view_if_needed()
    assert plot.is_visible(), "the F1 change plot is not shown inline"
    walk.shot("3-report-plot")


def step_4_promotion(walk: Walk) -> None:
    walk.nav("Catalog")
    walk.open_link("/assets/promoted_adapter")
    fit = walk.metadata_fit()
    walk.shot("4-promotion")
    assert fit["keys"][:3] == ["decision", "reason", "challenger"] and "production_adapter" in fit["keys"], fit["keys"]
    walk.assert_whole(fit, "promoted_adapter's decision")


def every_asset_page_whole(walk: Walk) -> None:
    """Beyond the README's steps: no asset page's metadata needs a sideways scroll either."""
    for asset in ASSETS:
        walk.page.goto(f"{walk.url}/assets/{asset}", wait_until="networkidle")
        walk.page.wait_for_timeout(1000)
        walk.assert_whole(walk.metadata_fit(), f"{asset}'s metadata")


def step_5_evaluate(walk: Walk) -> None:
    walk.nav("Runs")
    before, _ = walk.newest_run()
    walk.nav("Jobs")
    walk.open_link("/jobs/evaluate")
    box = walk.page.get_by_role("button", name="Materialize all").bounding_box()
    walk.page.mouse.click(box["x"] + box["width"] + 14, box["y"] + box["height"] / 2)  # the ▾ joined to its right
    walk.page.wait_for_timeout(800)
    walk.page.get_by_role("menuitem", name="Open launchpad").click()
    walk.page.wait_for_timeout(2500)
    editor = "() => [...document.querySelectorAll('.CodeMirror')].filter(e => e.getBoundingClientRect().height > 100).map(e => e.CodeMirror)[0]"
    config = walk.page.evaluate(f"() => ({editor})().getValue()")
    assert re.search(r"tuned_predictions:\n\s+config:\n\s+adapter_id: auto", config), config
    edited = config.replace("adapter_id: auto", "adapter_id: auto\n      max_new_tokens: 8")
    walk.page.evaluate(f"(text) => ({editor})().setValue(text)", edited)
    walk.page.wait_for_timeout(1500)
    walk.shot("5-launchpad")
    walk.page.locator("button").filter(has_text=re.compile(r"^\s*Materialize\s*$")).last.click()  # the launchpad's own button
    walk.page.wait_for_timeout(2000)
    walk.nav("Runs")
    outcome = walk.launched_run_outcome(before, timeout_s=240)
    walk.shot("5-evaluate-run")
    assert outcome == "Success", f"the evaluate run ended: {outcome}"
    assert re.search(r"\bevaluate\b", walk.newest_run()[1]), "the newest run is not evaluate's"


def turn_on_data_change_sensor(page, url: str) -> None:
    page.goto(f"{url}/locations/lorasum/sensors/retrain_on_data_change", wait_until="networkidle")
    page.locator("input[type=checkbox]").first.locator("xpath=..").click()  # the switch drawn over the hidden input
    page.wait_for_timeout(1000)
    assert page.locator("input[type=checkbox]").first.is_checked(), "the sensor did not start"


def check_sensor_says_why(page, url: str) -> None:
    """docs/ui.md: reload the sensor's page after its first tick; the tick's "0 runs requested"
    opens the reason."""
    page.goto(f"{url}/locations/lorasum/sensors/retrain_on_data_change", wait_until="networkidle")
    result = page.locator("button:has-text('0 runs requested'), a:has-text('0 runs requested')")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not result.count():
        page.wait_for_timeout(3000)
        page.reload(wait_until="networkidle")
    result.first.click()
    page.wait_for_timeout(2000)
    page.screenshot(path=str(ARTIFACTS / "ui-sensor-skip.png"))
    reason = page.get_by_text(re.compile(r"not retraining: raw_dialogsum would fail .*cannot tell the split"))
    assert reason.count() >= 1, "the sensor's tick does not say why it started no run"


def test_the_readme_five_steps_at_1440_and_1280(dagster_ui):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        for width in WIDTHS:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.goto(dagster_ui, wait_until="networkidle")
            skip = page.get_by_role("button", name="Skip")  # "Join the Dagster community" on a first visit
            try:
                skip.wait_for(timeout=5000)
                skip.click()
            except PlaywrightTimeout:
                pass
            if width == WIDTHS[0]:
                turn_on_data_change_sensor(page, dagster_ui)
            walk = Walk(page, dagster_ui, width)
            for step in (step_1_lineage, step_2_train_and_evaluate, step_3_report, step_4_promotion, every_asset_page_whole, step_5_evaluate):
                step(walk)
            if width == WIDTHS[0]:
                check_sensor_says_why(page, dagster_ui)
            page.close()
        browser.close()
