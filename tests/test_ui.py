"""The Prefect UI in a real browser: Debian `chromium` driven by Playwright starts the fine-tune deployment with
the Run button (Quick run, then a Custom run that changes one parameter); the API confirms both runs
completed, the custom one with that parameter, and that they never overlapped (concurrency limit 1).
A screenshot of the finished run page is saved under tests/artifacts/.

The stack is deployments/stack.sh on a free port (see tests/test_deployment.py). Runs use the tiny settings as
the deployment's defaults and the same CSV and outputs as the deployment tests, so the Quick run is served
from the stage cache when those ran first.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_deployment import FINETUNE, start_stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "tests" / "artifacts"
CUSTOM_RUN_NAME = "ui-custom-run"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory, "ui")
    yield s
    assert s.stop() == [], "stack.sh left processes running"


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def open_run_menu(page, stack) -> None:
    page.goto(f"{stack.url}/deployments")
    page.get_by_role("link", name="personatune", exact=True).first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/"))
    page.get_by_role("button", name="Run", exact=True).click()


def create_run_by_clicking(page, click, attempts: int = 1) -> dict:
    """`click()` a button that creates a flow run; return the run the UI's create_flow_run request got back.

    On a loaded 2-core box (a Quick run training on both cores) the run form can still be settling when Submit
    is clicked, and such a click sends nothing (seen once in CI: no request, no run). A click that sent its
    request is never repeated (its answer is awaited, however slow) unless the server answered 503 (nothing
    created), so one Submit never makes two runs; one
    that sent nothing within a minute is repeated, at most `attempts` times, and the failure lists every
    request the page made.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    sent: list[str] = []

    def record(r) -> None:
        sent.append(f"{r.method} {r.url}")

    page.on("request", record)
    creates = lambda r: r.method == "POST" and r.url.endswith("/create_flow_run")  # noqa: E731
    try:
        for attempt in range(1, attempts + 1):
            try:
                with page.expect_request(creates, timeout=60_000) as request:
                    click()
            except PlaywrightTimeout:
                print(f"\n[ui] click {attempt} sent no create_flow_run request within 60 s")
                continue
            response = request.value.response()  # the server's answer, however long it takes
            assert response is not None, f"create_flow_run failed: {request.value.failure}"
            if response.status == 503:  # the server shed the request under load (seen in CI): nothing was created
                print(f"\n[ui] click {attempt}: create_flow_run answered 503 Service Unavailable")
                continue
            assert response.status == 201, f"create_flow_run answered {response.status}: {response.text()[:2000]}"
            return response.json()
        raise AssertionError(f"no flow run created after {attempts} click(s) at {page.url}; requests made:\n"
                             + "\n".join(sent[-40:]))
    finally:
        page.remove_listener("request", record)


def test_run_button_quick_and_custom_runs(stack, page):
    known = {r["id"] for r in stack.runs_of(FINETUNE)}
    defaults = stack.deployment(FINETUNE)["parameters"]

    # 1. Quick run: the deployment's default parameters
    def quick_run() -> None:
        open_run_menu(page, stack)
        page.get_by_text("Quick run", exact=True).click()

    created = create_run_by_clicking(page, quick_run, attempts=3)
    quick = stack.wait_new_run(FINETUNE, known, timeout=60)
    assert quick["id"] == created["id"]
    known.add(quick["id"])

    # 2. Custom run: the run form, one parameter changed (the bundle's folder name), submitted
    open_run_menu(page, stack)
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url(re.compile(r"/run"))
    field = page.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text=re.compile(r"^run_name\b")))
    field.locator("input, textarea").first.fill(CUSTOM_RUN_NAME)
    created = create_run_by_clicking(page, page.get_by_role("button", name="Submit", exact=True).click, attempts=3)
    custom = stack.wait_new_run(FINETUNE, known, timeout=60)
    assert custom["id"] == created["id"]

    quick, custom = stack.wait(quick["id"]), stack.wait(custom["id"])
    for run in (quick, custom):
        assert run["state"]["type"] == "COMPLETED", f"{run['name']}: {run['state']}\n{stack.logs(run['id'])}"

    # the API sees exactly what the buttons asked for
    assert quick["parameters"] == defaults
    assert custom["parameters"]["run_name"] == CUSTOM_RUN_NAME
    # the form submits every field: the deployment's defaults, the schema's elsewhere, run_name changed
    assert {k: custom["parameters"].get(k) for k in defaults if k != "run_name"} == \
        {k: v for k, v in defaults.items() if k != "run_name"}
    bundle = Path(defaults["output_dir"]) / CUSTOM_RUN_NAME
    assert (bundle / ".complete").is_file() and (bundle / "adapter_model.safetensors").is_file()
    cfg = json.loads((bundle / "training_config.json").read_text())
    assert cfg["config"]["run_name"] == CUSTOM_RUN_NAME and cfg["config"]["max_steps"] == defaults["max_steps"]

    # concurrency limit 1: the second run started only after the first finished
    first, second = sorted((quick, custom), key=lambda r: when(r["start_time"]))
    assert when(second["start_time"]) >= when(first["end_time"]), (first["end_time"], second["start_time"])
    if when(second["created"]) < when(first["end_time"]):  # it was submitted while the first held the slot: it waited
        assert any(s["name"] == "AwaitingConcurrencySlot" for s in stack.states(second["id"]))

    # 3. the finished run's page, as a test artifact
    page.goto(f"{stack.url}/runs/flow-run/{custom['id']}")
    page.get_by_text("Completed").first.wait_for()
    page.get_by_text(custom["name"]).first.wait_for()
    time.sleep(1)  # let the graph and logs settle for the picture
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-finished-run.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"\n[ui] screenshot of the finished run page: {shot}")


def test_eval_report_artifact_shows_the_plot_and_rounded_numbers(stack, page):
    """The `eval-report` artifact as the UI shows it: the loss plot is an image that loaded (it travels inside
    the artifact as a data URI; the bundle's relative `eval_plot.png` is out of the browser's reach) and the
    training losses are rounded as in the table."""
    run_id = stack.run(FINETUNE)  # the deployment's defaults: served from the stage cache after the runs above
    run = stack.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{stack.logs(run_id)}"
    artifact = stack.artifacts(run_id)["eval-report"]
    losses = re.search(r"logged loss (\S+) -> (\d+(?:\.\d+)?)", artifact["data"])
    assert losses and all(re.fullmatch(r"\d+\.\d{4}", x) for x in losses.groups()), artifact["data"][:2000]

    page.goto(f"{stack.url}/artifacts/artifact/{artifact['id']}")
    plot = page.locator("img[alt='training curves and base / champion / challenger']")
    plot.wait_for()
    page.wait_for_function("img => img.complete", arg=plot.element_handle())
    assert plot.get_attribute("src").startswith("data:image/png;base64,")
    assert plot.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1100, 380]  # 11 x 3.8 in at 100 dpi
    page.get_by_text(f"logged loss {losses[1]} -> {losses[2]}").first.wait_for()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-eval-report.png"), full_page=True)
