"""The stack the way users run it: deployments/stack.sh (real `prefect server`, work pool, `prefect deploy --all`
from prefect.yaml, real process worker), then runs through the API: a deployment run with tiny settings, the
watcher + event trigger on a changed CSV, no run on an unchanged one, and a failing run on an invalid one.

Each test module starts its own stack on a free port with PREFECT_HOME in a temp folder. The CSV, the
output folder and Prefect's result storage are shared across modules (under pytest's base temp), so a later
module's runs of the same data hit the stage cache instead of training again.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import QUOTES, ROOT, TINY_EVAL_SETS

# Tiny settings: two optimizer steps, 10 held-out rows (eval_fraction 0.03 of 342), short replies. Plain LoRA
# (load_in_4bit=False): these tests are about orchestration; the QLoRA path is covered by tests/test_flow.py,
# and 4-bit generation in the evaluation is several times slower on a CPU.
# force_promote: two steps are not meant to pass the release gate (tests/test_release.py); 8-row evaluation sets.
TINY = dict(max_steps=2, micro_batch_size=2, grad_accum=1, num_samples=1, max_new_tokens=16, load_in_4bit=False,
            eval_fraction=0.03, force_promote=True, golden_csv=TINY_EVAL_SETS["golden_csv"])
FINETUNE = "finetune/personatune"
WATCHER = "watch-quotes/every-5-minutes"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shared_work(tmp_path_factory) -> Path:
    """CSV + outputs + result storage shared by the deployment and UI modules (same paths -> cache hits)."""
    work = tmp_path_factory.getbasetemp() / "personatune-work"
    (work / "outputs").mkdir(parents=True, exist_ok=True)
    (work / "storage").mkdir(exist_ok=True)
    shutil.copy(QUOTES, work / "quotes.csv")  # always start from the repository's data
    return work


class RetryingClient(httpx.Client):
    """The server answers 503 when SQLite is busy (a loaded 2-core box): retry those and dropped connections."""

    def request(self, *args, **kwargs) -> httpx.Response:
        for attempt in range(6):
            try:
                response = super().request(*args, **kwargs)
                if response.status_code != 503:
                    return response
            except httpx.TransportError:
                if attempt == 5:
                    raise
            time.sleep(1 + attempt)
        return response


class Stack:
    """deployments/stack.sh in its own process group, and a small client of the REST API it serves."""

    def __init__(self, home: Path, work: Path, log_path: Path):
        self.home = home
        self.tiny = dict(TINY)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = RetryingClient(base_url=self.url + "/api", timeout=60)
        self.work, self.log_path = work, log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PERSONATUNE_PORT=str(self.port), PREFECT_HOME=str(home), HF_HUB_OFFLINE="1",
                   PREFECT_LOCAL_STORAGE_PATH=str(work / "storage"), PREFECT_WORKER_QUERY_SECONDS="2",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([str(ROOT / "deployments" / "stack.sh")], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    # -- lifecycle --------------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 300) -> None:
        """Both deployments exist and a worker of the pool is online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stack.sh exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if all(self.api.get(f"/deployments/name/{d}").status_code == 200 for d in (FINETUNE, WATCHER)):
                    workers = self.api.post("/work_pools/personatune-local/workers/filter", json={}).json()
                    if any(w.get("status") == "ONLINE" for w in workers):
                        return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"stack not ready after {timeout} s:\n{self.log_tail()}")

    def leftovers(self) -> list[int]:
        """Processes of this stack still alive (flow runs start in their own sessions): found by PREFECT_HOME."""
        marker = f"PREFECT_HOME={self.home}".encode()
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if marker in proc.joinpath("environ").read_bytes().split(b"\0") and int(proc.name) != os.getpid():
                    found.append(int(proc.name))
            except OSError:
                pass
        return found

    def stop(self) -> list[int]:
        """SIGTERM to stack.sh (as Ctrl-C would); returns what its cleanup left alive (then kills that too)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        left = self.leftovers()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.api.close()
        self.log.close()
        return left

    def log_tail(self, n: int = 60) -> str:
        self.log.flush()
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])

    # -- API helpers ------------------------------------------------------------------------------------
    def deployment(self, name: str) -> dict:
        r = self.api.get(f"/deployments/name/{name}")
        r.raise_for_status()
        return r.json()

    def set_defaults(self, name: str, parameters: dict) -> None:
        """What a user does in the UI's 'Edit deployment': new default parameters (used by Quick run, triggers)."""
        r = self.api.patch(f"/deployments/{self.deployment(name)['id']}", json={"parameters": parameters})
        r.raise_for_status()

    def pause_schedules(self, name: str) -> list[dict]:
        dep = self.deployment(name)
        for s in dep["schedules"]:
            self.api.patch(f"/deployments/{dep['id']}/schedules/{s['id']}", json={"active": False}).raise_for_status()
        return dep["schedules"]

    def run(self, name: str, parameters: dict | None = None) -> str:
        r = self.api.post(f"/deployments/{self.deployment(name)['id']}/create_flow_run",
                          json={"parameters": parameters or {}})
        r.raise_for_status()
        return r.json()["id"]

    def flow_run(self, run_id: str) -> dict:
        r = self.api.get(f"/flow_runs/{run_id}")
        r.raise_for_status()
        return r.json()

    def runs_of(self, name: str) -> list[dict]:
        dep_id = self.deployment(name)["id"]
        r = self.api.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [dep_id]}},
                                                     "sort": "EXPECTED_START_TIME_ASC"})
        r.raise_for_status()
        return r.json()

    def wait(self, run_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state"]["type"] in TERMINAL:
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} not finished after {timeout} s: {self.flow_run(run_id)['state']}"
                           f"\n{self.log_tail()}")

    def wait_new_run(self, name: str, known: set[str], timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = [r for r in self.runs_of(name) if r["id"] not in known]
            if new:
                assert len(new) == 1, f"expected one new run of {name}, got {[r['name'] for r in new]}"
                return new[0]
            time.sleep(0.5)
        raise TimeoutError(f"no new run of {name} within {timeout} s\n{self.log_tail()}")

    def artifacts(self, run_id: str) -> dict[str, dict]:
        r = self.api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        r.raise_for_status()
        return {a["key"]: a for a in r.json() if a.get("key")}

    def states(self, run_id: str) -> list[dict]:
        r = self.api.get("/flow_run_states/", params={"flow_run_id": run_id})
        r.raise_for_status()
        return r.json()

    def events(self, name: str) -> list[dict]:
        r = self.api.post("/events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 50})
        r.raise_for_status()
        return r.json()["events"]

    def wait_log(self, run_id: str, text: str, timeout: float = 60) -> str:
        """Logs arrive in batches after the state: wait until `text` shows up in the run's logs."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs(run_id)
            if text in logs or time.monotonic() > deadline:
                return logs
            time.sleep(1)

    def wait_events(self, name: str, count: int, timeout: float = 60) -> list[dict]:
        """Events are stored by a batching service a few seconds after triggers see them."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events(name)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(1)

    def logs(self, run_id: str) -> str:
        r = self.api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        r.raise_for_status()
        return "\n".join(entry["message"] for entry in r.json())


def start_stack(tmp_path_factory, tag: str) -> Stack:
    work = shared_work(tmp_path_factory)
    home = tmp_path_factory.mktemp(f"prefect-home-{tag}")
    stack = Stack(home, work, home / "stack.log")
    try:
        stack.wait_ready()
        # The watcher's 5-minute schedule stays paused in tests (runs are started by hand), and both
        # deployments point at the temp CSV and outputs, never at the repository's.
        stack.tiny["probes_csv"] = ""  # no probe generations in tests: a few minutes less of CPU
        stack.pause_schedules(WATCHER)
        stack.set_defaults(WATCHER, {"quotes_csv": str(work / "quotes.csv"), "output_dir": str(work / "outputs")})
        stack.set_defaults(FINETUNE, {"quotes_csv": str(work / "quotes.csv"), "output_dir": str(work / "outputs"),
                                      **stack.tiny})
    except BaseException:
        stack.stop()
        raise
    print(f"\n[stack:{tag}] {stack.url}  log: {stack.log_path}")
    return stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory, "deploy")
    yield s
    assert s.stop() == [], "stack.sh left processes running"


@pytest.fixture(scope="module")
def first_run(stack):
    """One deployment run with tiny settings, as `prefect deployment run` or the API would start it."""
    params = {"quotes_csv": str(stack.work / "quotes.csv"), "output_dir": str(stack.work / "outputs"), **stack.tiny}
    run = stack.wait(stack.run(FINETUNE, params))
    return params, run


def bundle_of(output_dir: Path) -> Path:
    latest = Path(output_dir) / "latest"
    assert (latest / ".complete").is_file(), f"no complete bundle behind {latest}"
    return latest.resolve()


# ------------------------------------------------------------------------------------------------------------
def test_stack_serves_both_deployments_from_prefect_yaml(stack):
    ft = stack.deployment(FINETUNE)
    assert ft["work_pool_name"] == "personatune-local"
    assert set(ft["tags"]) >= {"personatune", "finetune"}
    # concurrency_limit: 1 -> a deployment-scoped global limit of one slot; extra runs are enqueued
    assert ft["global_concurrency_limit"]["limit"] == 1
    assert ft["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    # the run form: every config field with type, default and description
    props = ft["parameter_openapi_schema"]["properties"]
    assert props["max_steps"]["type"] == "integer" and props["max_steps"]["default"] == -1
    assert props["learning_rate"]["type"] == "number" and props["base_model"]["type"] == "string"
    assert props["load_in_4bit"]["type"] == "boolean"
    assert all(p.get("description") for p in props.values()), "every parameter needs a description in the form"
    assert ft["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]

    w = stack.deployment(WATCHER)
    assert [s["schedule"]["interval"] for s in w["schedules"]] == [300.0]
    assert w["parameter_openapi_schema"]["properties"]["force"]["type"] == "boolean"

    # the deployment trigger is an automation: quotes.csv.changed -> run finetune/personatune
    autos = stack.api.post("/automations/filter", json={}).json()
    mine = [a for a in autos if any(act.get("deployment_id") == ft["id"] for act in a["actions"])]
    assert len(mine) == 1 and mine[0]["enabled"]
    assert mine[0]["trigger"]["expect"] == ["quotes.csv.changed"]
    assert mine[0]["actions"][0]["parameters"]["quotes_csv"] == "{{ event.payload.path }}"


def test_deployment_run_trains_and_publishes_the_bundle(stack, first_run):
    params, run = first_run
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{stack.logs(run['id'])}"
    csv_sha = sha256(stack.work / "quotes.csv")
    bundle = bundle_of(params["output_dir"])
    names = {p.name for p in bundle.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_config.json", "eval.json",
            "report.md", "history.json"} <= names
    cfg = json.loads((bundle / "training_config.json").read_text())
    assert cfg["data_sha256"] == csv_sha and cfg["config"]["max_steps"] == 2
    assert len(json.loads((bundle / "history.json").read_text())["loss"]) == 2

    # names and tags in the UI: base model and data hash; the deployment's tags
    assert run["name"] == f"smollm2-135m-instruct@{csv_sha[:8]}"
    assert {"personatune", "finetune"} <= set(run["tags"])
    # artifacts: eval report (markdown), loss history (table), training progress (finished at 100 %)
    arts = stack.artifacts(run["id"])
    assert arts["eval-report"]["type"] == "markdown" and "loss" in arts["eval-report"]["data"].lower()
    table = json.loads(arts["loss-history"]["data"]) if isinstance(arts["loss-history"]["data"], str) \
        else arts["loss-history"]["data"]
    assert arts["loss-history"]["type"] == "table" and [row["step"] for row in table] == [1, 2]
    assert all(row["loss"] > 0 for row in table)
    assert arts["training-progress"]["type"] == "progress" and float(arts["training-progress"]["data"]) == 100.0


def test_watcher_unchanged_csv_starts_nothing(stack, first_run):
    before = {r["id"] for r in stack.runs_of(FINETUNE)}
    watch = stack.wait(stack.run(WATCHER), timeout=300)
    assert watch["state"]["type"] == "COMPLETED", stack.logs(watch["id"])
    assert "unchanged" in stack.wait_log(watch["id"], "unchanged")
    time.sleep(3)
    assert {r["id"] for r in stack.runs_of(FINETUNE)} == before
    assert stack.wait_events("quotes.csv.changed", 1, timeout=5) == []


def test_changed_csv_is_retrained_through_event_and_trigger(stack, first_run):
    quotes = stack.work / "quotes.csv"
    old_bundle = bundle_of(stack.work / "outputs")
    with open(quotes, "a", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerow(["Respond as Wednesday Addams.", "Do you want to build a snowman?",
                                "Only if it melts slowly, in front of an audience that loved it."])
    new_sha = sha256(quotes)
    before = {r["id"] for r in stack.runs_of(FINETUNE)}

    watch = stack.wait(stack.run(WATCHER), timeout=300)
    assert watch["state"]["type"] == "COMPLETED", stack.logs(watch["id"])
    triggered = stack.wait_new_run(FINETUNE, before, timeout=30)
    (event,) = stack.wait_events("quotes.csv.changed", 1)
    assert event["payload"]["path"] == str(quotes) and event["payload"]["sha256"] == new_sha
    assert event["payload"]["previous_sha256"] == json.loads((old_bundle / "training_config.json").read_text())["data_sha256"]
    assert triggered["parameters"]["quotes_csv"] == str(quotes)

    # while that run trains, the next watcher tick does not start a second one for the same content
    again = stack.wait(stack.run(WATCHER), timeout=300)
    assert again["state"]["type"] == "COMPLETED" and "already started" in stack.wait_log(again["id"], "already started")

    done = stack.wait(triggered["id"])
    assert done["state"]["type"] == "COMPLETED", f"{done['state']}\n{stack.logs(done['id'])}"
    assert done["name"] == f"smollm2-135m-instruct@{new_sha[:8]}"
    bundle = bundle_of(stack.work / "outputs")
    assert bundle != old_bundle
    assert json.loads((bundle / "training_config.json").read_text())["data_sha256"] == new_sha
    assert len(stack.runs_of(FINETUNE)) == len(before) + 1

    # trained: the watcher is quiet again, and no new run appears
    quiet = stack.wait(stack.run(WATCHER), timeout=300)
    assert quiet["state"]["type"] == "COMPLETED" and "unchanged" in stack.wait_log(quiet["id"], "unchanged")
    time.sleep(3)
    assert len(stack.runs_of(FINETUNE)) == len(before) + 1
    assert len(stack.wait_events("quotes.csv.changed", 2, timeout=5)) == 1


def test_invalid_csv_starts_a_run_that_fails_with_the_validation_error(stack, first_run):
    quotes = stack.work / "quotes.csv"
    published = sorted(p.name for p in (stack.work / "outputs").iterdir() if not p.name.startswith("."))
    latest = bundle_of(stack.work / "outputs")
    lines = quotes.read_text(encoding="utf-8").splitlines()
    quotes.write_text("\n".join(lines + ['"Respond as Wednesday Addams.","Any last words?",""']) + "\n",
                      encoding="utf-8")
    bad_line = len(lines) + 1
    before = {r["id"] for r in stack.runs_of(FINETUNE)}

    watch = stack.wait(stack.run(WATCHER), timeout=300)
    assert watch["state"]["type"] == "COMPLETED", stack.logs(watch["id"])
    triggered = stack.wait_new_run(FINETUNE, before, timeout=30)
    done = stack.wait(triggered["id"], timeout=600)
    assert done["state"]["type"] == "FAILED"
    message = done["state"]["message"]
    assert "problem(s) in the quotes CSV" in message and f"quotes.csv:{bad_line}" in message, message
    assert "response" in message
    # nothing published: same bundles, latest unchanged
    assert sorted(p.name for p in (stack.work / "outputs").iterdir() if not p.name.startswith(".")) == published
    assert bundle_of(stack.work / "outputs") == latest


def test_gpu_work_pool_templates_and_deployments_are_accepted(stack):
    """The Docker and Kubernetes GPU templates create pools, and deployments/prefect-gpu.yaml deploys onto them."""
    pools = {"personatune-gpu-docker": ("docker", "docker-gpu.base-job-template.json"),
             "personatune-gpu-k8s": ("kubernetes", "k8s-gpu.base-job-template.json")}
    for name, (kind, template) in pools.items():
        tpl = json.loads((ROOT / "deployments" / template).read_text())
        r = stack.api.post("/work_pools/", json={"name": name, "type": kind, "base_job_template": tpl})
        assert r.status_code == 201, r.text
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=stack.url + "/api", PREFECT_HOME=str(stack.home), HF_HUB_OFFLINE="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    out = subprocess.run(["prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect-gpu.yaml", "--all"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

    docker = stack.deployment("finetune/personatune-gpu-docker")
    assert docker["work_pool_name"] == "personatune-gpu-docker"
    jv = docker["job_variables"]
    assert jv["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert docker["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/personatune"}}]
    assert docker["parameters"]["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert docker["global_concurrency_limit"]["limit"] == 1
    k8s = stack.deployment("finetune/personatune-gpu-k8s")
    assert k8s["job_variables"]["gpu_count"] == 1
    pool = stack.api.get("/work_pools/personatune-gpu-k8s").json()
    container = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    # the GPU deployments have no trigger: a CSV change trains once, on the local deployment
    autos = stack.api.post("/automations/filter", json={}).json()
    assert not [a for a in autos for act in a["actions"] if act.get("deployment_id") in (docker["id"], k8s["id"])]
