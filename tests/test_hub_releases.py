"""Releases on the Hub: each run on its branch `release/<run>`, main moves only on promotion, rollback restores an
earlier release byte for byte. The real huggingface_hub client talks HTTP to tests/hub_server.py.

Three real bundles (fresh LoRA adapters of the embedded model, seeds 1, 2, 3, written by `write_bundle`) are
built once per module; every test pushes into a repo of its own, so each passes alone and in any order.
A and B carry history.json; C has none but adds eval_plot.png, so promotion and rollback must delete files.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import traceback
import uuid
from pathlib import Path

import pytest

from tests.hub_server import HubServer

TOKEN = "hf_test_" + secrets.token_hex(12)
RUNS = {  # run -> (seed, created): names as default_run_name makes them, UTC time + data hash prefix
    "A": (1, dt.datetime(2026, 11, 29, 0, 12, 34, tzinfo=dt.timezone.utc)),
    "B": (2, dt.datetime(2026, 11, 30, 8, 15, 0, tzinfo=dt.timezone.utc)),
    "C": (3, dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.timezone.utc)),
}
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d49444154789c6360000002000100ffff03000006000557bfabd40000000049454e44ae426082")


@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens={TOKEN: "you"}) as server:
        yield server


@pytest.fixture(scope="module")
def online(hub):
    """The HF client online and pointed at the local server; the token is passed explicitly, never in the env."""
    import huggingface_hub.constants

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", hub.url)
    mp.setenv("HF_HUB_OFFLINE", "0")  # conftest sets 1 for the rest of the suite; the client reads the constant
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    mp.delenv("HF_TOKEN", raising=False)
    yield hub
    mp.undo()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, base_model_dir, tokenizer) -> dict[str, Path]:
    """Bundles A, B, C as the flow writes them: adapter + tokenizer, eval.json, report.md, training_config.json."""
    from personatune.bundle import write_bundle
    from personatune.config import FinetuneConfig
    from personatune.model import load_qlora_model

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for i, (label, (seed, created)) in enumerate(RUNS.items()):
        cfg = FinetuneConfig(seed=seed, output_dir=str(root / "outputs"))
        data_sha = hashlib.sha256(f"quotes {label}".encode()).hexdigest()
        run = created.strftime("%Y%m%d-%H%M%S") + f"-{data_sha[:8]}"
        adapter, evaluation = root / f"adapter-{label}", root / f"eval-{label}"
        load_qlora_model(base_model_dir, cfg, trainable=True).save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        if label != "C":
            (adapter / "history.json").write_text(json.dumps([{"step": 1, "loss": 3.1 - i / 10}]) + "\n")
        evaluation.mkdir()
        tuned = 2.9 - i / 10
        (evaluation / "eval.json").write_text(json.dumps({
            "eval_loss": {"base": 3.2, "tuned": tuned}, "train_loss": {"base": 3.1, "tuned": tuned - 0.2},
            "eval_perplexity": {"base": 24.5, "tuned": 18.2}, "eval_rows": 52, "train_rows": 64,
            "training": {"steps": 40 + i}, "samples": [], "golden_rows": 72, "probe_prompts": 64,
            "decoding": {"max_new_tokens": 64, "repetition_penalty": 1.1, "no_repeat_ngram_size": 0},
            "metrics": {"base": {"golden_loss": 4.7, "persona_similarity": None if label == "B" else 0.17,
                                 "run_on_rate": 0.4, "loop_rate": 0.3, "heldout_loss": 3.2},
                        "challenger": {"golden_loss": 2.5 - i / 10, "run_on_rate": 0.0, "loop_rate": 0.0,
                                       "persona_similarity": None if label == "B" else 0.61 + i / 100,
                                       "heldout_loss": tuned}},
        }, indent=2) + "\n")
        (evaluation / "report.md").write_text(f"# Evaluation of run {run}\n")
        if label == "C":
            (evaluation / "eval_plot.png").write_bytes(PNG)
        out[label] = write_bundle(cfg, run, adapter, evaluation,
                                  {"data_sha256": data_sha, "code_version": "test", "created": created.isoformat()})
    digests = {sha256(b / "adapter_model.safetensors") for b in out.values()}
    assert len(digests) == 3  # three seeds, three different adapters
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def release_entry(bundle: Path, verdict: str) -> dict:
    tc = json.loads((bundle / "training_config.json").read_text())
    metrics = json.loads((bundle / "eval.json").read_text())["metrics"]["challenger"]
    return {"run": bundle.name, "data_sha256": tc["data_sha256"], "created": tc["created"], "verdict": verdict,
            "golden_loss": metrics["golden_loss"], "persona_similarity": metrics["persona_similarity"]}


def new_repo() -> str:
    return f"you/releases-{uuid.uuid4().hex[:8]}"


def files_at(hub: HubServer, repo: str, rev: str) -> dict[str, bytes]:
    return hub.repos[repo].resolve(rev).files


def download(hub: HubServer, repo: str, cache: Path, revision: str | None = None) -> dict[str, bytes]:
    """Every file of the revision, as a user gets it: snapshot_download with the real client."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache, token=TOKEN, endpoint=hub.url))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def three_releases(online, bundles):
    """A promoted, B rejected (its branch only), C promoted; each card carries the history up to its run."""
    from personatune.hub import push_release

    hub, repo = online, new_repo()
    history = [release_entry(bundles["A"], "promoted")]
    a = push_release(bundles["A"], repo, TOKEN, promote=True, releases=history)
    history.append(release_entry(bundles["B"], "rejected"))
    b = push_release(bundles["B"], repo, TOKEN, promote=False, releases=history)
    history.append(release_entry(bundles["C"], "promoted"))
    c = push_release(bundles["C"], repo, TOKEN, promote=True, releases=history)
    return repo, {"A": a, "B": b, "C": c}


# ------------------------------------------------------------------------------------------------------------
def test_release_branch_is_release_slash_run():
    from personatune.hub import HubPublishError, release_branch

    assert release_branch("20261129-001234-70af8535") == "release/20261129-001234-70af8535"
    for bad in ("", "a b", "../main", "refs/pr/1", "x.lock", "-x"):
        with pytest.raises(HubPublishError, match="cannot name a release branch"):
            release_branch(bad)


def test_first_release_promoted_makes_main_that_release_byte_for_byte(online, bundles, tmp_path):
    from personatune.hub import push_release

    hub, repo, a = online, new_repo(), bundles["A"]
    start = len(hub.requests)
    pushed = push_release(a, repo, TOKEN, promote=True)

    branch = f"release/{a.name}"
    assert pushed.branch == branch and pushed.repo_id == repo and pushed.endpoint == hub.url
    r = hub.repos[repo]
    assert r.private  # private by default
    assert r.refs[branch] == pushed.branch_commit_oid and r.refs["main"] == pushed.main_commit_oid
    assert pushed.main_commit_url == f"{hub.url}/{repo}/commit/{pushed.main_commit_oid}"
    data_sha = json.loads((a / "training_config.json").read_text())["data_sha256"]
    assert [c.summary for c in r.commits] == [
        "initial commit", f"personatune run {a.name}: data sha256 {data_sha[:12]}", f"Promote {branch} to main"]
    # The client URL-encodes the branch; one commit on the branch, one on main.
    encoded = branch.replace("/", "%2F")
    paths = [p for m, p, s in hub.requests[start:] if m == "POST" and s == 200]
    assert f"/api/models/{repo}/branch/{encoded}" in paths
    assert [p for p in paths if "/commit/" in p] == [f"/api/models/{repo}/commit/{encoded}",
                                                     f"/api/models/{repo}/commit/main"]

    main, release = download(hub, repo, tmp_path / "hf"), download(hub, repo, tmp_path / "hf", revision=branch)
    assert main == release
    assert hashlib.sha256(main["adapter_model.safetensors"]).hexdigest() == sha256(a / "adapter_model.safetensors")
    bundle_files = {p.name for p in a.iterdir() if not p.name.startswith(".")}
    assert set(main) == bundle_files | {"README.md", ".gitattributes"}
    for name in bundle_files - {"adapter_config.json"}:  # adapter_config.json names the Hub base instead
        assert main[name] == (a / name).read_bytes(), name


def test_unpromoted_release_lands_on_its_branch_and_main_stays(online, bundles, tmp_path):
    from huggingface_hub import hf_hub_download

    from personatune.hub import push_release

    hub, repo = online, new_repo()
    a = push_release(bundles["A"], repo, TOKEN, promote=True)
    main_before = hub.repos[repo].refs["main"]
    b = push_release(bundles["B"], repo, TOKEN, promote=False)

    assert b.main_commit_url is None and b.main_commit_oid is None
    assert hub.repos[repo].refs["main"] == main_before == a.main_commit_oid
    get = lambda rev: Path(hf_hub_download(repo, "adapter_model.safetensors", revision=rev,  # noqa: E731
                                           cache_dir=tmp_path / "hf", token=TOKEN, endpoint=hub.url))
    assert sha256(get(b.branch)) == sha256(bundles["B"] / "adapter_model.safetensors")
    assert sha256(get("main")) == sha256(bundles["A"] / "adapter_model.safetensors")
    # B's branch started at main (release A) but holds only B: nothing of A's bundle lingers there.
    assert files_at(hub, repo, b.branch)["training_config.json"] == (bundles["B"] / "training_config.json").read_bytes()


def test_promoting_a_later_release_makes_main_equal_it(online, bundles, three_releases, tmp_path):
    hub, (repo, pushed) = online, three_releases
    c = pushed["C"]
    assert hub.repos[repo].refs["main"] == c.main_commit_oid
    main = download(hub, repo, tmp_path / "hf")
    assert main == files_at(hub, repo, c.branch)
    assert hashlib.sha256(main["adapter_model.safetensors"]).hexdigest() == sha256(
        bundles["C"] / "adapter_model.safetensors")
    assert main["eval_plot.png"] == PNG and "history.json" not in main  # A's history.json was deleted


def test_rollback_by_run_name_restores_the_release_byte_for_byte(online, bundles, three_releases, tmp_path):
    from huggingface_hub import HfApi

    from personatune.hub import rollback_hub

    hub, (repo, pushed) = online, three_releases
    a_run = bundles["A"].name
    commits_before = len(hub.repos[repo].commits)
    url, oid = rollback_hub(repo, TOKEN, a_run, run_label="rollback-flow-run")

    r = hub.repos[repo]
    assert len(r.commits) == commits_before + 1 and r.refs["main"] == oid  # one commit
    assert url == f"{hub.url}/{repo}/commit/{oid}"
    assert r.commits[-1].summary == f"Roll back main to {a_run} (release/{a_run})"
    assert "rollback-flow-run" in r.commits[-1].description
    main = download(hub, repo, tmp_path / "hf")
    assert main == download(hub, repo, tmp_path / "hf", revision=pushed["A"].branch)
    assert hashlib.sha256(main["adapter_model.safetensors"]).hexdigest() == sha256(
        bundles["A"] / "adapter_model.safetensors")
    assert "eval_plot.png" not in main and main["history.json"] == (bundles["A"] / "history.json").read_bytes()

    # Rolling back to what main already holds makes no commit.
    assert rollback_hub(repo, TOKEN, a_run) == (url, oid) and len(r.commits) == commits_before + 1
    # Any commit oid or tag works too.
    _, oid_c = rollback_hub(repo, TOKEN, pushed["C"].branch_commit_oid)
    assert files_at(hub, repo, "main") == files_at(hub, repo, pushed["C"].branch)
    HfApi(endpoint=hub.url, token=TOKEN).create_tag(repo, tag="good-one", revision=pushed["A"].branch)
    rollback_hub(repo, TOKEN, "good-one")
    assert files_at(hub, repo, "main") == files_at(hub, repo, pushed["A"].branch)


def test_list_hub_releases_marks_the_release_main_holds(online, bundles, three_releases):
    from personatune.hub import list_hub_releases, rollback_hub

    hub, (repo, pushed) = online, three_releases
    releases = list_hub_releases(repo, TOKEN)
    assert [(r["run"], r["branch"], r["commit_oid"], r["is_main"]) for r in releases] == [
        (bundles[k].name, pushed[k].branch, pushed[k].branch_commit_oid, k == "C") for k in "ABC"]

    rollback_hub(repo, TOKEN, bundles["A"].name)
    assert [r["is_main"] for r in list_hub_releases(repo, TOKEN)] == [True, False, False]


def test_a_retried_push_release_makes_no_extra_commit(online, bundles):
    from personatune.hub import HubTransientError, push_release

    hub, repo, a = online, new_repo(), bundles["A"]
    hub.fail("POST", rf"^/api/models/{repo}/commit/main$", [503])
    with pytest.raises(HubTransientError, match="503"):
        push_release(a, repo, TOKEN, promote=True)
    r = hub.repos[repo]
    assert "main" in r.refs and len(r.commits) == 2  # the branch commit landed, main did not move

    start = len(hub.requests)
    retried = push_release(a, repo, TOKEN, promote=True)  # what the task's retry does
    assert len(r.commits) == 3 and r.refs["main"] == retried.main_commit_oid
    branch_commits = [p for m, p, s in hub.requests[start:] if m == "POST" and "/commit/release" in p]
    assert branch_commits == []  # the branch already held the bundle: nothing re-sent

    start = len(hub.requests)
    again = push_release(a, repo, TOKEN, promote=True)
    assert again == retried and len(r.commits) == 3
    assert [p for m, p, s in hub.requests[start:] if "/commit/" in p] == []


def test_model_card_on_main_has_the_release_history(online, bundles, three_releases, tmp_path):
    from huggingface_hub import ModelCard

    from personatune.hub import EMBEDDED_BASE_ON_HUB, render_model_card

    hub, (repo, pushed) = online, three_releases
    (tmp_path / "README.md").write_bytes(download(hub, repo, tmp_path / "hf")["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict()["base_model"] == EMBEDDED_BASE_ON_HUB  # metadata still parses
    text = card.text
    assert "## Release history" in text and f"This is `release/{bundles['C'].name}`" in text
    a, b, c = (bundles[k] for k in "ABC")
    sha = lambda bundle: json.loads((bundle / "training_config.json").read_text())["data_sha256"][:8]  # noqa: E731
    assert (f"| `{a.name}` | `{sha(a)}` | 2026-11-29 00:12 UTC | 2.5000 | 0.610 | promoted |" in text)
    assert (f"| `{b.name}` | `{sha(b)}` | 2026-11-30 08:15 UTC | 2.4000 | \u2014 | rejected |" in text)
    assert (f"| `{c.name}` | `{sha(c)}` | 2026-12-01 12:00 UTC | 2.3000 | 0.630 | promoted |" in text)
    table = text[text.index("| run | data |"):]
    assert table.index(a.name) < table.index(b.name) < table.index(c.name)  # in the order given
    assert "Release history" not in render_model_card(a, repo)  # push_bundle's card is unchanged


def test_rollback_to_an_unknown_run_fails_naming_repo_and_run_never_the_token(online, bundles, three_releases,
                                                                              tmp_path):
    from personatune.hub import HubPublishError, rollback_hub

    hub, (repo, _) = online, three_releases
    commits_before = len(hub.repos[repo].commits)
    with pytest.raises(HubPublishError) as unknown:
        rollback_hub(repo, TOKEN, "20991231-000000-deadbeef")
    message = str(unknown.value)
    assert repr(repo) in message and "'20991231-000000-deadbeef'" in message
    assert "release/20991231-000000-deadbeef" in message
    assert all(bundles[k].name in message for k in "ABC")  # the releases it could roll back to
    with pytest.raises(HubPublishError, match="404") as missing_commit:
        rollback_hub(repo, TOKEN, "0123abcd" * 5)
    assert repr(repo) in str(missing_commit.value) and "0123abcd" * 5 in str(missing_commit.value)
    with pytest.raises(HubPublishError, match="404") as missing_repo:
        rollback_hub("you/no-such-repo", TOKEN, bundles["A"].name)
    assert "'you/no-such-repo'" in str(missing_repo.value)

    assert len(hub.repos[repo].commits) == commits_before  # nothing was committed
    for error in (unknown.value, missing_commit.value, missing_repo.value):
        for text in (str(error), repr(error), "".join(traceback.format_exception(error))):
            assert TOKEN not in text


def test_first_release_in_a_repo_without_a_commit_on_main(online, bundles, tmp_path):
    """Some self-hosted servers create repos with no commit: main gets a short README first, so the branch has
    somewhere to start; an unpromoted release leaves main at that README."""
    from personatune.hub import list_hub_releases, push_release

    with HubServer(tokens={TOKEN: "you"}, initial_commit=False) as hub:
        repo = new_repo()
        a = push_release(bundles["A"], repo, TOKEN, promote=False, endpoint=hub.url)
        assert set(files_at(hub, repo, "main")) == {"README.md"}
        assert b"No release has been promoted yet" in files_at(hub, repo, "main")["README.md"]
        assert files_at(hub, repo, a.branch)["adapter_model.safetensors"] == (
            bundles["A"] / "adapter_model.safetensors").read_bytes()

        b = push_release(bundles["B"], repo, TOKEN, promote=True, endpoint=hub.url)
        assert files_at(hub, repo, "main") == files_at(hub, repo, b.branch)
        assert "history.json" in files_at(hub, repo, "main")
        assert [r["is_main"] for r in list_hub_releases(repo, TOKEN, endpoint=hub.url)] == [False, True]
