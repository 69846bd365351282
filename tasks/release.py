"""The release tasks: find the champion, judge the challenger against it, then make it live (or not) and say so.

The decisions themselves are plain code (personatune.release); here they get a Prefect face: the verdict as a
Markdown artifact, and the events `personatune.adapter.promoted` / `personatune.adapter.rejected` that automations
can follow (deployments/automation-rejected.yaml). An event that cannot be sent is logged and never fails a run.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from personatune.bundle import render_release
from personatune.config import from_mapping
from personatune.files import sha256_file
from personatune.release import (bundle_rows, champion_bundle, dataset_rows, diff_rows, judge, promote_and_record,
                                 release_entry)
from tasks.publish import hub_token

EVENT_PREFIX = "personatune.adapter"


@task(name="find_champion", retries=2, retry_delay_seconds=[5, 20])
def find_champion(config: dict, base_fingerprint: str) -> dict | None:
    """The live adapter to beat: outputs/latest; with no local one and `hub_repo` set, the Hub repo's `main`.

    Returns {"path", "name", "source"} or None (the first release is judged against the base). A champion trained
    on another base model cannot be compared with: it is ignored, loudly. A Hub that cannot be read (token, rights,
    network) fails the task: judging against the base by mistake would let the challenger overwrite `main`."""
    cfg = from_mapping(config)
    log = get_run_logger()
    found = None
    local = champion_bundle(cfg.output_dir)
    if local is not None:
        found = {"path": str(local), "name": local.name, "source": "local"}
    elif cfg.hub_repo:
        from personatune.hub import HubError, resolve_adapter

        try:
            folder = Path(resolve_adapter(cfg.hub_repo, "main", token=hub_token()[0]))
        except HubError as e:
            if e.status != 404:
                raise
            folder = None  # a new repo: no main yet
        if folder is not None and (folder / "adapter_model.safetensors").is_file():
            found = {"path": str(folder), "name": f"{cfg.hub_repo}@main", "source": "hub"}
    if found is None:
        log.info("no champion yet: the challenger is judged against the base model")
        return None
    trained_on = json.loads((Path(found["path"]) / "training_config.json").read_text()).get("base_model_fingerprint") \
        if (Path(found["path"]) / "training_config.json").is_file() else None
    if trained_on and trained_on != base_fingerprint:
        log.warning("champion %s was trained on another base model (fingerprint %s, this run %s): it cannot be "
                    "compared with; judging against the base", found["name"], trained_on[:12], base_fingerprint[:12])
        return None
    log.info("champion: %s (%s)", found["name"], "outputs/latest" if found["source"] == "local" else "the Hub")
    return found


def same_adapter(a: str | None, b: str | None) -> bool:
    """Byte-identical adapters (weights and config): an unchanged re-run trains the champion's own adapter."""
    return bool(a and b) and all(sha256_file(Path(a) / f) == sha256_file(Path(b) / f)
                                 for f in ("adapter_model.safetensors", "adapter_config.json"))


@task(name="judge")
def judge_challenger(config: dict, eval_dir: str, dataset_dir: str, champion: dict | None, adapter_dir: str) -> dict:
    """The verdict (promote or reject, with every check's numbers) and what changed in the data since the champion."""
    cfg = from_mapping(config)
    metrics = json.loads((Path(eval_dir) / "eval.json").read_text())["metrics"]
    identical = champion["name"] if champion and same_adapter(champion["path"], adapter_dir) else None
    verdict = judge(metrics, min_improvement_over_base=cfg.min_improvement_over_base,
                    max_loss_increase=cfg.max_loss_increase, max_similarity_drop=cfg.max_similarity_drop,
                    force=cfg.force_promote, identical_to=identical)
    rows = dataset_rows(dataset_dir)
    old_rows = bundle_rows(champion["path"]) if champion else None
    return {"verdict": verdict.to_dict(), "diff": diff_rows(old_rows, rows), "rows": rows,
            "champion": champion["name"] if champion else None,
            "champion_has_rows": old_rows is not None if champion else None,
            "judged_against_local": champion["name"] if champion and champion["source"] == "local" else None}


def pending_entry(run_dir: str, release: dict) -> dict:
    """The release log's line for this run, before it is recorded (the model card's history shows it)."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "eval.json").read_text())["metrics"]
    data_sha = json.loads((run_dir / "training_config.json").read_text())["data_sha256"]
    return {**release_entry(run_dir.name, data_sha, release["verdict"], metrics, release["diff"]),
            "champion": release["champion"]}


@task(name="release")
def release_bundle(config: dict, run_dir: str, release: dict, entry: dict, hub: dict | None) -> dict:
    """Record the run in outputs/releases.json and, if promoted, move outputs/latest to it (unless the champion
    changed meanwhile); emit the event; attach the verdict as an artifact."""
    cfg = from_mapping(config)
    log = get_run_logger()
    run_dir = Path(run_dir)
    if hub and hub.get("branch"):
        entry = {**entry}
        entry["hub"] = {"repo": hub["repo_id"], "branch": hub["branch"], "branch_commit": hub.get("branch_commit_oid"),
                        "main_commit": hub.get("main_commit_oid")}
    entry = promote_and_record(cfg.output_dir, run_dir.name, entry, release["judged_against_local"])
    verdict = {**release["verdict"], "promoted": entry["verdict"] == "promoted", "reason": entry["reason"]}
    (log.info if verdict["promoted"] else log.warning)("%s: %s", run_dir.name, verdict["reason"])
    metrics = json.loads((run_dir / "eval.json").read_text())["metrics"]
    emit_release_event(run_dir.name, entry["data_sha256"], verdict, metrics, release["diff"], release["champion"], log)
    create_markdown_artifact(key="release-verdict", markdown=render_release({**release, "verdict": verdict}),
                             description=f"Release verdict of {run_dir.name}")
    return entry


def event_payload(run: str, data_sha: str, verdict: dict, metrics: dict, diff: dict | None,
                  champion: str | None) -> dict:
    keep = ("golden_loss", "persona_similarity", "run_on_rate", "loop_rate", "heldout_loss")
    return {
        "run": run, "data_sha256": data_sha, "champion": champion, "promoted": verdict["promoted"],
        "forced": verdict["forced"], "reason": verdict["reason"],
        "metrics": {role: {k: m.get(k) for k in keep} for role, m in metrics.items()},
        "diff": {k: diff[k] for k in ("added", "removed", "edited", "unchanged")} if diff else None,
        "diff_samples": diff["samples"] if diff else None,
    }


def emit_release_event(run: str, data_sha: str, verdict: dict, metrics: dict, diff: dict | None,
                       champion: str | None, log) -> None:
    from prefect.events import emit_event

    name = f"{EVENT_PREFIX}.{'promoted' if verdict['promoted'] else 'rejected'}"
    try:
        emit_event(event=name, resource={"prefect.resource.id": f"{EVENT_PREFIX}.{run}", "prefect.resource.name": run,
                                         "personatune.data-sha256": data_sha},
                   payload=event_payload(run, data_sha, verdict, metrics, diff, champion))
    except Exception as e:  # noqa: BLE001 - an event is a notification, never a reason to fail the run
        log.warning("could not emit %s: %s", name, e)
