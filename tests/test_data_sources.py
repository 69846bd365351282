"""Quotes, golden and probe CSVs read from a Hub dataset repo (`hf://`) or a bucket (`s3://`), over the real
protocols: `huggingface_hub`'s HfFileSystem talking HTTP to tests/hub_server.py, and s3fs talking to moto's S3
server (`moto.server.ThreadedMotoServer`), both on 127.0.0.1.

One tiny fine-tune (two steps) on a dataset-repo revision is shared by the module (`trained`); the S3 run on the
same content takes every stage from its cache and only publishes.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import secrets
import socket
import time
import traceback
from pathlib import Path

import httpx
import pytest

from tests.conftest import QUOTES, ROOT, TINY_EVAL_SETS
from tests.hub_server import HubServer

TOKEN = "hf_test_" + secrets.token_hex(12)
DATASET = "you/wednesday-quotes"
EVENT = "quotes.csv.changed"
# Two optimizer steps of plain LoRA on 60 rows: the run is about where the data comes from, not about quality.
TINY = dict(max_steps=2, micro_batch_size=2, grad_accum=1, num_samples=1, max_new_tokens=8, load_in_4bit=False,
            eval_fraction=0.1, force_promote=True, probes_csv="", persona_similarity=False)
HEADER = ["instruction", "user", "response"]
ROWS = list(csv.reader(QUOTES.read_text(encoding="utf-8").splitlines()))[1:61]


def csv_bytes(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([HEADER, *rows])
    return buf.getvalue().encode()


V1 = csv_bytes(ROWS)
V2 = csv_bytes(ROWS + [["Respond as Wednesday Addams.", "Do you like snow?", "Only when it buries something."]])
V3 = csv_bytes(ROWS[:-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- servers and environment -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens={TOKEN: "you"}) as server:
        yield server


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server; boto3 (for the test's own writes) and s3fs reach it through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    mp = pytest.MonkeyPatch()
    for key, value in dict(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                           AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1").items():
        mp.setenv(key, value)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="versioned")
    client.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    client.create_bucket(Bucket="plain")
    yield client
    mp.undo()
    server.stop()


@pytest.fixture(scope="module")
def online(prefect_env, hub):
    """The HF client online, pointed at the local server, with the token in HF_TOKEN (as on a worker)."""
    import huggingface_hub.constants

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", hub.url)
    mp.setenv("HF_HUB_OFFLINE", "0")  # conftest sets 1 for the rest of the suite; the client reads the constant
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    mp.setenv("HF_TOKEN", TOKEN)
    yield hub
    mp.undo()


def api(hub: HubServer):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=TOKEN)


def push(hub: HubServer, repo: str, files: dict[str, bytes], message: str = "edit quotes") -> str:
    from huggingface_hub import CommitOperationAdd

    client = api(hub)
    client.create_repo(repo, repo_type="dataset", exist_ok=True)
    ops = [CommitOperationAdd(path, data) for path, data in files.items()]
    return client.create_commit(repo, ops, commit_message=message, repo_type="dataset").oid


def downloads(hub: HubServer, repo: str) -> int:
    return len(hub.calls("GET", rf"^/datasets/{repo}/resolve/"))


def events(name: str = EVENT) -> list[dict]:
    """Events stored by the test server (its batching service writes them a moment after they arrive)."""
    from prefect.settings import PREFECT_API_URL

    r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 50})
    r.raise_for_status()
    return r.json()["events"]


def wait_events(count: int, resource: str, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in events() if e["resource"]["prefect.resource.id"].endswith(resource)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


# --- Hub dataset repo: read, cache, revisions, errors ----------------------------------------------------------
def test_hub_csv_is_downloaded_once_and_a_commit_elsewhere_is_a_cache_hit(online, tmp_path):
    from personatune.sources import fetch

    repo = "you/cache-quotes"
    first = push(online, repo, {"quotes.csv": V1})
    url = f"hf://datasets/{repo}/quotes.csv"

    got = fetch(url, tmp_path, TOKEN)
    assert Path(got["path"]).read_bytes() == V1 and not got["cached"]
    assert got["source"]["revision"] == first and got["source"]["dataset"] == repo
    assert got["source"]["pinned"] == f"hf://datasets/{repo}@{first}/quotes.csv"
    assert downloads(online, repo) == 1

    again = fetch(url, tmp_path, TOKEN)
    assert again["cached"] and again["path"] == got["path"] and again["sha256"] == got["sha256"]
    # a commit that leaves quotes.csv alone: new revision, same blob, no download
    other = push(online, repo, {"README.md": b"# quotes\n"}, "docs")
    third = fetch(url, tmp_path, TOKEN)
    assert third["cached"] and third["source"]["revision"] == other and third["path"] == got["path"]
    assert downloads(online, repo) == 1

    push(online, repo, {"quotes.csv": V2})
    changed = fetch(url, tmp_path, TOKEN)
    assert not changed["cached"] and Path(changed["path"]).read_bytes() == V2 and changed["path"] != got["path"]
    assert downloads(online, repo) == 2


def test_hub_revision_syntax_reads_that_commit_branch_or_tag(online, tmp_path):
    from personatune.sources import fetch

    repo = "you/revision-quotes"
    old = push(online, repo, {"quotes.csv": V1})
    api(online).create_tag(repo, tag="v1", repo_type="dataset")
    push(online, repo, {"quotes.csv": V2})

    assert Path(fetch(f"hf://datasets/{repo}@{old}/quotes.csv", tmp_path)["path"]).read_bytes() == V1
    assert Path(fetch(f"hf://datasets/{repo}@v1/quotes.csv", tmp_path)["path"]).read_bytes() == V1
    assert Path(fetch(f"hf://datasets/{repo}@main/quotes.csv", tmp_path)["path"]).read_bytes() == V2
    assert Path(fetch(f"hf://datasets/{repo}/quotes.csv", tmp_path)["path"]).read_bytes() == V2


def test_hub_errors_name_the_url_and_what_failed_without_the_token(online, tmp_path, monkeypatch):
    from personatune.sources import DataSourceError, fetch

    repo = "you/private-quotes"
    api(online).create_repo(repo, repo_type="dataset", private=True)
    push(online, repo, {"quotes.csv": V1})
    wrong = "hf_wrong_" + secrets.token_hex(12)
    cases = {
        f"hf://datasets/you/no-such-repo/quotes.csv": (TOKEN, "not found"),
        f"hf://datasets/{repo}/missing.csv": (TOKEN, "not found"),
        f"hf://datasets/{repo}@no-such-branch/quotes.csv": (TOKEN, "not found"),
        f"hf://datasets/{repo}/quotes.csv": (wrong, "no permission"),
    }
    for url, (token, reason) in cases.items():
        with pytest.raises(DataSourceError) as info:
            fetch(url, tmp_path, token)
        text = "".join(traceback.format_exception(info.value))
        assert info.value.reason == reason and str(info.value).startswith(f"{url}: {reason}"), text
        assert token not in text and wrong not in text
    # a private repo without a token looks missing, as on the Hub (and the message says so)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(DataSourceError, match="not found: .*private repo"):
        fetch(f"hf://datasets/{repo}/quotes.csv", tmp_path, None)

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(DataSourceError) as info:
        fetch(f"hf://datasets/{repo}/quotes.csv", tmp_path, TOKEN)
    assert info.value.reason == "no network" and TOKEN not in "".join(traceback.format_exception(info.value))
    assert not list(tmp_path.iterdir()), "a failed download leaves nothing in the cache"

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    with pytest.raises(DataSourceError, match=f"^hf://datasets/{repo}/quotes.csv: no network: HF_HUB_OFFLINE=1"):
        fetch(f"hf://datasets/{repo}/quotes.csv", tmp_path, TOKEN)


# --- S3: read, cache, versions, errors --------------------------------------------------------------------------
def test_s3_csv_is_downloaded_once_and_a_version_is_pinned(s3, tmp_path):
    from personatune.sources import describe, fetch

    s3.put_object(Bucket="versioned", Key="cache/quotes.csv", Body=V1)
    url = "s3://versioned/cache/quotes.csv"
    first = fetch(url, tmp_path)
    assert Path(first["path"]).read_bytes() == V1 and not first["cached"]
    version = first["source"]["revision"]
    assert version and first["source"]["pinned"] == f"{url}?versionId={version}"
    mtime = Path(first["path"]).stat().st_mtime_ns
    again = fetch(url, tmp_path)
    assert again["cached"] and Path(again["path"]).stat().st_mtime_ns == mtime

    s3.put_object(Bucket="versioned", Key="cache/quotes.csv", Body=V2)
    now = describe(url)
    assert now.revision != version and now.content_id != first["source"]["content_id"]
    assert Path(fetch(first["source"]["pinned"], tmp_path)["path"]).read_bytes() == V1  # the old version, pinned
    assert Path(fetch(url, tmp_path)["path"]).read_bytes() == V2

    # an unversioned bucket: the ETag names the content, no version to pin
    s3.put_object(Bucket="plain", Key="quotes.csv", Body=V1)
    plain = fetch("s3://plain/quotes.csv", tmp_path)
    assert plain["source"]["revision"] == "" and plain["source"]["pinned"] == "s3://plain/quotes.csv"
    assert plain["sha256"] == first["sha256"]


def test_s3_errors_name_the_url_and_what_failed(s3, tmp_path, monkeypatch):
    from personatune.sources import DataSourceError, fetch

    for url in ("s3://versioned/nowhere/quotes.csv", "s3://no-such-bucket/quotes.csv"):
        with pytest.raises(DataSourceError, match=f"^{url}: not found"):
            fetch(url, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries of a refused connection: 9 s more
    with pytest.raises(DataSourceError, match="^s3://versioned/x.csv: no network") as info:
        fetch("s3://versioned/x.csv", tmp_path)
    assert "testing" not in "".join(traceback.format_exception(info.value))  # no credentials in the chain either


# --- a run, the watcher, provenance -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(online, tmp_path_factory):
    """The watcher announces the first revision of a dataset repo; the fine-tune flow trains on the event's
    (pinned) path, with the golden set from the same repo, and pushes the adapter to the Hub."""
    from flows.finetune import finetune
    from flows.watch import watch_quotes

    first = push(online, DATASET, {"quotes.csv": V1, "golden.csv": Path(TINY_EVAL_SETS["golden_csv"]).read_bytes()})
    out = tmp_path_factory.mktemp("work") / "outputs"
    url = f"hf://datasets/{DATASET}/quotes.csv"
    announced = watch_quotes(quotes_csv=url, output_dir=str(out))
    summary = finetune(quotes_csv=announced["path"], golden_csv=f"hf://datasets/{DATASET}/golden.csv",
                       output_dir=str(out), hub_repo="you/wednesday-adapter", run_name="hub-data", **TINY)
    return {"url": url, "first": first, "out": out, "announced": announced, "summary": summary}


def test_a_run_on_a_hub_revision_records_it_in_bundle_card_and_commit(trained, online):
    from huggingface_hub import ModelCard

    first, announced = trained["first"], trained["announced"]
    assert announced["status"] == "emitted" and announced["revision"] == first
    assert announced["path"] == f"hf://datasets/{DATASET}@{first}/quotes.csv"
    bundle = Path(trained["summary"]["run_dir"])
    tc = json.loads((bundle / "training_config.json").read_text())
    assert tc["config"]["quotes_csv"] == announced["path"]  # the URL as given, not a cache path
    quotes = tc["data_sources"]["quotes_csv"]
    assert quotes["revision"] == first and quotes["dataset"] == DATASET and quotes["pinned"] == announced["path"]
    assert tc["data_sources"]["golden_csv"]["revision"] == first
    assert tc["data_sha256"] == hashlib.sha256(V1).hexdigest()

    card = ModelCard(online.repos["you/wednesday-adapter"].resolve("main").files["README.md"].decode())
    assert card.data.datasets == [DATASET]
    assert card.data.personatune["data_source"] == announced["path"]
    assert f"`hf://datasets/{DATASET}/quotes.csv` at revision `{first}`" in card.text
    commits = online.repos["you/wednesday-adapter"].commits
    assert any(f"Data source (quotes_csv): {announced['path']}\n" in c.description for c in commits)


def test_hub_watcher_emits_once_per_change_with_the_new_revision(trained, online, tmp_path):
    from personatune.data import load_quotes
    from personatune.sources import fetch
    from flows.watch import watch_quotes

    url, out = trained["url"], trained["out"]
    before = downloads(online, DATASET)
    assert watch_quotes(quotes_csv=url, output_dir=str(out))["status"] == "unchanged"
    push(online, DATASET, {"notes.md": b"curation notes\n"}, "notes")  # a commit that leaves the CSV alone
    assert watch_quotes(quotes_csv=url, output_dir=str(out))["status"] == "unchanged"
    assert downloads(online, DATASET) == before, "the watcher reads metadata only"
    assert len(wait_events(1, url, timeout=5)) == 1  # the first revision's event (trained fixture), nothing since

    second = push(online, DATASET, {"quotes.csv": V2})
    changed = watch_quotes(quotes_csv=url, output_dir=str(out))
    assert changed["status"] == "emitted" and changed["revision"] == second
    assert watch_quotes(quotes_csv=url, output_dir=str(out))["status"] == "already-emitted"
    found = wait_events(2, url)
    assert len(found) == 2 and sum(e["payload"]["revision"] == second for e in found) == 1
    (event,) = [e for e in found if e["payload"]["revision"] == second]
    assert event["payload"]["path"] == f"hf://datasets/{DATASET}@{second}/quotes.csv"
    assert event["payload"]["url"] == url and event["payload"]["output_dir"] == str(out)
    assert downloads(online, DATASET) == before

    # the deployment's trigger passes the payload's path; a run started later reads exactly that revision
    import yaml

    finetune_dep = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                        if d["name"] == "personatune")
    assert finetune_dep["triggers"][0]["parameters"]["quotes_csv"] == "{{ event.payload.path }}"
    push(online, DATASET, {"quotes.csv": V3})
    pinned = fetch(event["payload"]["path"], tmp_path)
    assert pinned["source"]["revision"] == second
    assert len(load_quotes(pinned["path"])) == len(ROWS) + 1


def test_s3_watcher_and_a_run_on_the_announced_version(trained, s3):
    from flows.finetune import finetune
    from flows.watch import watch_quotes

    url, out = "s3://versioned/personas/quotes.csv", trained["out"]
    s3.put_object(Bucket="versioned", Key="personas/quotes.csv", Body=V1)  # the content the module trained on
    first = watch_quotes(quotes_csv=url, output_dir=str(out))
    assert first["status"] == "emitted" and first["path"] == f"{url}?versionId={first['revision']}"
    assert watch_quotes(quotes_csv=url, output_dir=str(out))["status"] == "already-emitted"

    summary = finetune(quotes_csv=first["path"], golden_csv=f"hf://datasets/{DATASET}/golden.csv", output_dir=str(out),
                       run_name="s3-data", **TINY)
    assert set(summary["stages"].values()) == {"cached"}  # same content as the Hub run: only the download is new
    tc = json.loads((Path(summary["run_dir"]) / "training_config.json").read_text())
    assert tc["data_sources"]["quotes_csv"]["revision"] == first["revision"]
    assert watch_quotes(quotes_csv=url, output_dir=str(out))["status"] == "unchanged"

    s3.put_object(Bucket="versioned", Key="personas/quotes.csv", Body=V2)
    changed = watch_quotes(quotes_csv=url, output_dir=str(out))
    assert changed["status"] == "emitted" and changed["revision"] not in ("", first["revision"])
    found = wait_events(2, url)
    assert [e["payload"]["revision"] for e in found].count(changed["revision"]) == 1 and len(found) == 2
