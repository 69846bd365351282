"""Publishing to the Hub and loading back, with the real huggingface_hub client talking HTTP to a local
Hub-protocol server (tests/hub_server.py) through HF_ENDPOINT.

One tiny training run is shared by the module; every later flow run takes all stages from the cache and only
publishes (a new run_name each time).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
import traceback
from pathlib import Path

import pytest

from tests.conftest import QUOTES, TINY_EVAL_SETS
from tests.hub_server import HubServer

TOKEN = "hf_test_" + secrets.token_hex(12)
BAD_TOKEN = "hf_wrong_" + secrets.token_hex(12)
REPO = "you/wednesday-adapter"
# Three steps; promoted by force (the release gate itself is tests/test_release.py's subject), so every push here
# also moves main.
TRAIN = dict(max_steps=3, micro_batch_size=2, grad_accum=1, learning_rate=2e-3, num_samples=1, max_new_tokens=16,
             force_promote=True, **{**TINY_EVAL_SETS, "probes_csv": ""})
STAGES = ("validate", "tokenize", "build_model", "train", "score", "evaluate")


@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens={TOKEN: "you"}) as server:
        yield server


@pytest.fixture(scope="module")
def env(tmp_path_factory, hub):
    """Prefect API + storage in a temp folder; the HF client online, pointed at the local server."""
    import huggingface_hub.constants

    home = tmp_path_factory.mktemp("prefect")
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_LOCAL_STORAGE_PATH", str(home / "storage"))
    mp.setenv("HF_ENDPOINT", hub.url)
    mp.setenv("HF_HUB_OFFLINE", "0")  # conftest sets 1 for the rest of the suite; the client reads the constant
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    mp.delenv("HF_TOKEN", raising=False)
    mp.setenv("PERSONATUNE_HF_TOKEN_BLOCK", "hf-token-test")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield home
    mp.undo()


@pytest.fixture(scope="module")
def local_run(env, hub, tmp_path_factory):
    """Train once, with no Hub repo configured: the bundle stays local."""
    from flows.finetune import finetune

    work = tmp_path_factory.mktemp("work")
    shutil.copy(QUOTES, work / "quotes.csv")
    params = dict(quotes_csv=str(work / "quotes.csv"), output_dir=str(work / "outputs"), **TRAIN)
    return params, finetune(run_name="local", **params)


def run_flow(params: dict, **changes) -> dict:
    from flows.finetune import finetune

    return finetune(**{**params, **changes})


def hub_requests_since(hub: HubServer, start: int) -> list[tuple[str, str, int]]:
    return [r for r in hub.requests[start:] if r[1] != "/api/agent-harnesses"]  # the client's own probe


def prefect_logs_and_artifacts() -> str:
    """Every log line and artifact the Prefect API holds, as one string."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    texts = []
    with get_client(sync_client=True) as client:
        offset = 0
        while page := client.read_logs(limit=200, offset=offset):
            texts += [log.message for log in page]
            offset += len(page)
        texts += [json.dumps(a.data) + str(a.description) for a in client.read_artifacts(limit=200)]
    return "\n".join(texts)


def assert_no_token(token: str, *, texts=(), folders=()) -> None:
    """The token is nowhere: not in the given texts, not in any file under the given folders."""
    for text in texts:
        assert token not in text
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert token.encode() not in path.read_bytes(), f"token found in {path}"


# ------------------------------------------------------------------------------------------------------------
def test_without_a_repo_the_bundle_stays_local(local_run, hub):
    params, summary = local_run
    assert summary["stages"] == {s: "ran" for s in STAGES}
    assert summary["hub"]["status"] == "local" and "kept the bundle local" in summary["hub"]["message"]
    assert summary["hub"]["commit_url"] is None
    assert hub_requests_since(hub, 0) == []  # nothing reached the Hub


def test_push_then_load_back_with_peft(local_run, hub, monkeypatch, tmp_path, caplog, capfd, base_model_dir,
                                       tokenizer):
    from huggingface_hub import ModelCard

    from flows.finetune import format_summary
    from personatune.config import FinetuneConfig
    from personatune.evaluate import generate_reply
    from personatune.hub import EMBEDDED_BASE_ON_HUB, resolve_adapter
    from personatune.model import load_qlora_model

    params, first = local_run
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    start = len(hub.requests)
    summary = run_flow(params, run_name="pushed", hub_repo=REPO)

    assert summary["stages"] == {s: "cached" for s in STAGES}
    result = summary["hub"]
    assert result["status"] == "pushed" and result["branch"] == "release/pushed", result
    repo = hub.repos[REPO]
    head = repo.resolve("main")
    assert result["commit_url"] == f"{hub.url}/{REPO}/commit/{head.oid}"
    assert f"Hub: pushed to {REPO} main and release/pushed: {result['commit_url']}" in format_summary(summary)
    assert repo.private  # private by default
    # The release branch got the bundle in one commit; promotion made main's files equal to it in one more.
    assert repo.resolve("release/pushed").files == head.files
    calls = hub_requests_since(hub, start)
    assert calls[0][:2] == ("GET", "/api/whoami-v2") and all(status < 400 for *_, status in calls)
    assert [p for m, p, _ in calls if "/commit/" in p] == [f"/api/models/{REPO}/commit/release%2Fpushed",
                                                             f"/api/models/{REPO}/commit/main"]
    run_dir = Path(summary["run_dir"])
    training = json.loads((run_dir / "training_config.json").read_text())
    branch_head = repo.resolve("release/pushed")
    assert training["data_sha256"][:12] in branch_head.summary and "pushed" in branch_head.summary
    assert head.summary == "Promote release/pushed to main"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "training_config.json", "eval.json", "generation_config.json", "release.json", "README.md"} <= set(head.files)
    assert ".complete" not in head.files

    # Link artifact with the commit URL.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        links = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["hub-commit"])))
    assert any(f"({result['commit_url']})" in a.data for a in links)  # Markdown link [repo@oid](url)

    # Anyone with access downloads it (by branch, and by commit with repo@revision) and loads it with peft.
    folder = Path(resolve_adapter(REPO, cache_dir=tmp_path / "hf"))
    assert Path(resolve_adapter(f"{REPO}@{head.oid}", cache_dir=tmp_path / "hf")) == folder
    assert resolve_adapter(str(run_dir)) == str(run_dir.resolve())  # a local folder is used as is
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(folder / "adapter_model.safetensors") == digest(run_dir / "adapter_model.safetensors")
    adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == EMBEDDED_BASE_ON_HUB  # not a path on the training box

    model = load_qlora_model(base_model_dir, FinetuneConfig(), adapter_dir=str(folder), trainable=False)
    from personatune.decoding import load_decoding

    out = generate_reply(model, tokenizer, "Respond as Wednesday Addams: deadpan and morbid.",
                         "Do you like sunny days?", load_decoding(folder))
    assert out["reply"] and "###" not in out["reply"] and "User:" not in out["reply"]
    if out["ended_by"] == "marker":
        assert out["raw"].rstrip().endswith("###")

    # The model card parses and holds metadata, the eval numbers, the template and the 3-line snippet.
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == EMBEDDED_BASE_ON_HUB and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"
    assert {"peft", "lora", "persona"} <= set(meta["tags"])
    assert meta["dataset_sha256"] == training["data_sha256"]
    ev = json.loads((run_dir / "eval.json").read_text())
    assert meta["personatune"]["eval_loss"] == {k: ev["eval_loss"][k] for k in ("base", "tuned")}
    golden = ev["metrics"]["challenger"]["golden_loss"]
    assert card.data.eval_results[0].metric_type == "loss"
    assert card.data.eval_results[0].metric_value == pytest.approx(golden, abs=1e-6)
    assert f"| {ev['metrics']['base']['golden_loss']:.4f} | {golden:.4f} |" in card.text  # base | challenger
    assert "Release verdict:" in card.text and "## Release history" in card.text
    assert "GenerationConfig.from_pretrained" in card.text
    # the contrast with the base is personatune's: the card says plain generate() ignores it and how to get it
    assert "contrasted with the base (`base_contrast` 0.7" in card.text and f"flows.chat --adapter {REPO}" in card.text
    assert "### Instruction:\n{instruction}\n\n### User:\n{user}\n\n### Response:\n" in card.text
    snippet = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
               f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{EMBEDDED_BASE_ON_HUB}"), '
               f'"{REPO}")\n')
    assert snippet in card.text

    out_err = capfd.readouterr()
    assert_no_token(TOKEN, texts=[caplog.text, out_err.out, out_err.err, prefect_logs_and_artifacts(),
                                  json.dumps(summary)],
                    folders=[params["output_dir"], tmp_path / "hf", os.environ["PREFECT_HOME"]])


def test_push_retries_5xx_with_backoff_and_reads_the_secret_block(local_run, hub, monkeypatch, caplog):
    """The commit answers 500 twice, then 200: the task retries (exponential backoff) and the push lands.
    The token comes from a Prefect Secret block this time (HF_TOKEN unset). A repo of its own, created by this
    push: the test needs no earlier test's push (it runs alone or in any order)."""
    from prefect.blocks.system import Secret

    params, _ = local_run
    repo_id = "you/retried-adapter"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    Secret(value=TOKEN).save("hf-token-test", overwrite=True)
    caplog.set_level(logging.INFO)
    hub.fail("POST", r"/commit/", [500, 500])
    start, t0 = len(hub.requests), time.monotonic()
    summary = run_flow(params, run_name="retried", hub_repo=repo_id)
    elapsed = time.monotonic() - t0

    assert summary["hub"]["status"] == "pushed"
    commits = [r[2] for r in hub_requests_since(hub, start) if "/commit/" in r[1]]
    assert commits == [500, 500, 200, 200]  # the branch commit twice refused, then branch and main
    assert len(hub.calls("GET", "/api/whoami-v2")) >= 3  # each retry re-runs the whole push task
    # the server's initial commit, then exactly one on the branch and one on main
    assert [c.summary for c in hub.repos[repo_id].commits][0] == "initial commit"
    assert len(hub.repos[repo_id].commits) == 1 + 2
    assert "retried" in hub.repos[repo_id].resolve("main").summary
    assert elapsed >= 2 + 4 * 0.8  # backoff 2 s, then 4 s (20% jitter)
    assert "Prefect Secret block 'hf-token-test'" in caplog.text
    assert_no_token(TOKEN, texts=[caplog.text, prefect_logs_and_artifacts()])


def test_bad_token_fails_fast_with_a_clear_message_and_no_leak(local_run, hub, monkeypatch, caplog, capfd):
    params, _ = local_run
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)  # HF_TOKEN wins over the Secret block saved above
    caplog.set_level(logging.DEBUG)
    start, t0 = len(hub.requests), time.monotonic()
    with pytest.raises(Exception) as info:
        run_flow(params, run_name="badtoken", hub_repo=REPO)
    elapsed = time.monotonic() - t0

    message = str(info.value)
    assert "401" in message and "rejected the token" in message and "HF_TOKEN" in message
    assert hub_requests_since(hub, start) == [("GET", "/api/whoami-v2", 401)]  # no retry, nothing uploaded
    assert elapsed < 60
    out_err = capfd.readouterr()
    texts = [message, repr(info.value), "".join(traceback.format_exception(info.value)), caplog.text,
             out_err.out, out_err.err, prefect_logs_and_artifacts()]
    assert any("rejected the token" in t for t in texts[3:])  # the message reached the logs too
    for token in (BAD_TOKEN, TOKEN):
        assert_no_token(token, texts=texts, folders=[params["output_dir"], os.environ["PREFECT_HOME"]])


def test_a_rejected_run_lands_on_its_branch_and_main_keeps_the_champion(local_run, hub, monkeypatch):
    """Release gate on the Hub: a destructive learning rate makes the golden loss far worse than the champion's
    (the local run): its bundle goes to release/<run> only and outputs/latest stays; --force-promote moves both."""
    params, _ = local_run
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    live = (Path(params["output_dir"]) / "latest").resolve()
    damaged = {**params, "learning_rate": 0.3, "force_promote": False}
    summary = run_flow(damaged, run_name="gated", hub_repo="you/gated-adapter")
    assert not summary["verdict"]["promoted"] and summary["verdict"]["reason"].startswith(
        "rejected against the champion: golden loss")
    assert summary["hub"]["status"] == "branch" and "main keeps the champion" in summary["hub"]["message"]
    repo = hub.repos["you/gated-adapter"]
    assert "adapter_model.safetensors" in repo.resolve("release/gated").files
    assert "adapter_model.safetensors" not in repo.resolve("main").files  # a new repo: main has no adapter yet
    assert (Path(params["output_dir"]) / "latest").resolve() == live

    forced = run_flow({**damaged, "force_promote": True}, run_name="forced", hub_repo="you/gated-adapter")
    assert forced["verdict"]["promoted"] and forced["verdict"]["forced"]
    assert forced["hub"]["status"] == "pushed" and (Path(params["output_dir"]) / "latest").resolve().name == "forced"
    assert repo.resolve("main").files["adapter_model.safetensors"] == \
        repo.resolve("release/forced").files["adapter_model.safetensors"]


def test_hub_errors_say_what_to_fix(env, hub, tmp_path):
    """Without Prefect: 403, 404 and connection errors are classified and explained."""
    from personatune.hub import HubPublishError, HubTransientError, push_bundle, resolve_adapter

    with pytest.raises(HubPublishError, match="403") as forbidden:
        push_bundle(tmp_path, "someone-else/adapter", TOKEN)
    assert "namespace 'someone-else'" in str(forbidden.value) and TOKEN not in str(forbidden.value)
    with pytest.raises(HubPublishError, match="404"):
        resolve_adapter("you/no-such-adapter", cache_dir=tmp_path / "hf", token=TOKEN)
    with pytest.raises(HubPublishError, match="neither a local folder nor a Hub repo id"):
        resolve_adapter("./no/such/folder")
    with pytest.raises(HubTransientError, match="cannot reach"):
        push_bundle(tmp_path, REPO, TOKEN, endpoint="http://127.0.0.1:9")
    with pytest.raises(HubPublishError, match="no Hugging Face token"):
        push_bundle(tmp_path, REPO, None)


def push_task_config(params: dict, repo: str) -> tuple[dict, dict]:
    """The push task's config and release-log entry for the module's local run (its bundle and log line)."""
    from personatune.config import from_mapping
    from personatune.release import read_log

    config = from_mapping({**params, "hub_repo": repo}).to_dict()
    return config, read_log(config["output_dir"])[-1]


def test_push_waits_for_a_hub_that_refuses_connections_then_answers(local_run, monkeypatch, caplog):
    """Nothing listens on the Hub's port for the first two attempts (connection refused); the server starts
    during the second wait, and the third attempt pushes. The waits are the backoff's 2 s and 4 s (+-20%)."""
    import socket

    from tasks.publish import push_to_hub

    params, summary = local_run
    with socket.socket() as probe:  # a port nobody listens on: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    late: list[HubServer] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:  # the Hub comes back while the task waits for its third attempt
            late.append(HubServer(tokens={TOKEN: "you"}, port=port).__enter__())

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.WARNING)
    config, entry = push_task_config(params, "you/late-adapter")
    try:
        result = push_to_hub(config, summary["run_dir"], True, entry, sleep=sleep)
        assert result["status"] == "pushed" and result["branch"] == "release/local"
        assert len(waits) == 2 and 1.6 <= waits[0] <= 2.4 and 3.2 <= waits[1] <= 4.8
        (server,) = late
        assert server.requests[0][:2] == ("GET", "/api/whoami-v2")  # the third attempt, from its start
        bundle = Path(summary["run_dir"])
        assert server.repos["you/late-adapter"].resolve("main").files["adapter_model.safetensors"] == \
            (bundle / "adapter_model.safetensors").read_bytes()
        assert caplog.text.count(f"cannot reach http://127.0.0.1:{port}") == 2 and "retrying in" in caplog.text
        assert_no_token(TOKEN, texts=[caplog.text])
    finally:
        for server in late:
            server.__exit__()


def test_push_honours_retry_after_on_429(local_run, hub, monkeypatch, caplog):
    """429 with Retry-After: 7 on the commit: the task waits 7 s (not the 2 s of its backoff) and the push lands
    with one commit on the branch and one on main. A Retry-After of an hour fails at once, saying so."""
    from personatune.hub import HubTransientError
    from tasks.publish import push_to_hub

    params, summary = local_run
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.WARNING)
    config, entry = push_task_config(params, "you/ratelimited-adapter")
    hub.fail("POST", r"/you/ratelimited-adapter/commit/", [429], headers={"Retry-After": "7"})
    start, waits = len(hub.requests), []
    result = push_to_hub(config, summary["run_dir"], True, entry, sleep=waits.append)
    assert result["status"] == "pushed"
    assert waits == [7.0]
    assert [r[2] for r in hub_requests_since(hub, start) if "/commit/" in r[1]] == [429, 200, 200]
    assert len(hub.repos["you/ratelimited-adapter"].commits) == 1 + 2  # the Hub's first, then branch and main
    assert "answered 429, asking to wait 7 s (Retry-After)" in caplog.text and "retrying in 7.0 s" in caplog.text

    hub.fail("POST", r"/you/patient-adapter/commit/", [429], headers={"Retry-After": "3600"})
    config, entry = push_task_config(params, "you/patient-adapter")
    waits.clear()
    with pytest.raises(HubTransientError, match="asks to wait 3600 s, more than the 300 s a push waits"):
        push_to_hub(config, summary["run_dir"], True, entry, sleep=waits.append)
    assert waits == []
