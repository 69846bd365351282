"""Releases end to end: a real `prefect server`, the fine-tune flow run three times as a user would
(`python -m flows.finetune`), the local Hub-protocol server, then `python -m flows.release` list and rollback.

first:  promoted (--force-promote: two steps are not meant to pass the gate) -> latest and the Hub's main
second: a destructive learning rate -> golden loss far above the champion's -> rejected: bundle kept, its branch
        pushed, latest and main unchanged
third:  promoted (forced) -> latest and main move to it
rollback --to first -> latest and main hold the first adapter again, byte for byte
The events personatune.adapter.promoted / .rejected / .rolled-back are read back from the server's API.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import QUOTES, ROOT, TINY_EVAL_SETS
from tests.hub_server import HubServer
from tests.test_deployment import free_port

TOKEN = "hf_test_" + secrets.token_hex(12)
REPO = "you/wednesday-releases"
FAST = ["--max-steps", "2", "--micro-batch-size", "2", "--grad-accum", "1", "--num-samples", "1",
        "--max-new-tokens", "16", "--eval-fraction", "0.03", "--golden-csv", TINY_EVAL_SETS["golden_csv"],
        "--probes-csv", TINY_EVAL_SETS["probes_csv"], "--hub-repo", REPO]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError("prefect server did not start: " + (home / "server.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
    work = tmp_path_factory.mktemp("releases")
    shutil.copy(QUOTES, work / "quotes.csv")
    out = work / "outputs"
    with HubServer(tokens={TOKEN: "you"}) as hub:
        env = {**os.environ, "PREFECT_API_URL": server, "PREFECT_HOME": str(work / "prefect-home"),
               "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "PYTHONUNBUFFERED": "1"}

        def run(*args: str, module: str = "flows.finetune") -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-m", module]
            if module == "flows.finetune":  # the run's own flags last: argparse keeps the last of a repeated flag
                cmd += ["--quotes-csv", str(work / "quotes.csv"), "--output-dir", str(out), *FAST]
            cmd += args
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            return proc

        started = time.time()
        procs = {
            "first": run("--run-name", "first", "--force-promote"),
            "second": run("--run-name", "second", "--learning-rate", "0.3", "--max-steps", "3"),
            "third": run("--run-name", "third", "--max-steps", "3", "--force-promote"),
        }
        state = {"main_before_rollback": hub.repos[REPO].resolve("main").files["adapter_model.safetensors"],
                 "second_branch": dict(hub.repos[REPO].resolve("release/second").files)}
        procs["list"] = run("list", "--outputs", str(out), "--hub-repo", REPO, module="flows.release")
        procs["rollback"] = run("rollback", "--to", "first", "--outputs", str(out), "--hub-repo", REPO,
                                module="flows.release")
        import huggingface_hub.constants
        from huggingface_hub import snapshot_download

        with pytest.MonkeyPatch.context() as mp:  # conftest keeps the suite offline; this server is local
            mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
            main = Path(snapshot_download(REPO, endpoint=hub.url, token=TOKEN, cache_dir=work / "hf"))
        yield {"out": out, "procs": procs, "hub_main": main, "started": started, "hub": hub, **state}


def output(proc) -> str:
    return proc.stdout + proc.stderr


def test_rejected_run_keeps_its_bundle_but_moves_nothing(runs):
    out, procs = runs["out"], runs["procs"]
    second = output(procs["second"])
    assert "Verdict: rejected against the champion: golden loss" in second
    assert "second (not live)" in second and "release/second only (main keeps the champion)" in second
    release = json.loads((out / "second" / "release.json").read_text())
    assert not release["verdict"]["promoted"] and release["champion"] == "first"
    failed = [c for c in release["verdict"]["checks"] if not c["passed"]]
    assert failed and failed[0]["metric"] == "golden_loss" and failed[0]["challenger"] > failed[0]["limit"]
    assert "adapter_model.safetensors" in runs["second_branch"]  # the rejected release is on its branch
    assert (out / "second" / ".complete").is_file()  # nothing lost: the complete bundle stays
    assert "Rejected" in (out / "second" / "report.md").read_text()
    third = output(procs["third"])
    assert "Verdict: promoted by --force-promote" in third or "Verdict: promoted over the champion" in third
    assert runs["main_before_rollback"] == (out / "third" / "adapter_model.safetensors").read_bytes()


def test_release_list_and_rollback_restore_the_first_adapter_locally_and_on_the_hub(runs):
    out, procs = runs["out"], runs["procs"]
    listing = output(procs["list"])
    for run, verdict in (("first", "promoted"), ("second", "rejected"), ("third", "promoted")):
        assert any(run in line and verdict in line for line in listing.splitlines()), listing
    assert "* third" in listing and "release/third" in listing
    assert (out / "latest").resolve().name == "first"
    first = out / "first" / "adapter_model.safetensors"
    assert digest(runs["hub_main"] / "adapter_model.safetensors") == digest(first)  # byte-identical
    assert digest(first) != digest(out / "third" / "adapter_model.safetensors")
    log = json.loads((out / "releases.json").read_text())["releases"]
    assert [(e["run"], e["verdict"]) for e in log] == [("first", "promoted"), ("second", "rejected"),
                                                        ("third", "promoted"), ("first", "rolled back")]
    assert log[1]["hub"]["branch"] == "release/second" and log[1]["hub"]["main_commit"] is None
    card = (runs["hub_main"] / "README.md").read_text()
    assert "## Release history" in card


def test_release_events_reach_the_server_with_the_documented_payload(runs, server):
    body = {"filter": {"event": {"prefix": ["personatune.adapter."]},
                       "occurred": {"since": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(runs["started"] - 60))}},
            "limit": 50}
    events = []
    for _ in range(30):  # events are written asynchronously: give the server a moment
        events = httpx.post(f"{server}/events/filter", json=body, timeout=30).json()["events"]
        if len(events) >= 4:
            break
        time.sleep(1)
    by_run = {(e["event"], e["resource"]["prefect.resource.name"]): e for e in events}
    assert set(by_run) == {("personatune.adapter.promoted", "first"), ("personatune.adapter.rejected", "second"),
                           ("personatune.adapter.promoted", "third"), ("personatune.adapter.rolled-back", "first")}
    rejected = by_run[("personatune.adapter.rejected", "second")]["payload"]
    assert rejected["run"] == "second" and rejected["champion"] == "first" and not rejected["promoted"]
    assert len(rejected["data_sha256"]) == 64 and rejected["reason"].startswith("rejected against the champion")
    assert set(rejected["metrics"]) == {"base", "champion", "challenger"}
    assert rejected["metrics"]["challenger"]["golden_loss"] > rejected["metrics"]["champion"]["golden_loss"]
    assert rejected["diff"] == {"added": 0, "removed": 0, "edited": 0, "unchanged": rejected["diff"]["unchanged"]}
    first = by_run[("personatune.adapter.promoted", "first")]["payload"]
    assert first["champion"] is None and set(first["metrics"]) == {"base", "challenger"} and first["diff"] is None
    rolled = by_run[("personatune.adapter.rolled-back", "first")]["payload"]
    assert rolled["hub"]["repo"] == REPO and rolled["local"].endswith("latest -> first")
