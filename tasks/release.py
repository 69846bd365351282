"""The release tasks: judge the challenger against the champion, then make it live (or not), say so, record it.

The decision itself is plain code (personatune.release); here it gets a Prefect face: the verdict as a Markdown
artifact, and the events `personatune.adapter.promoted` / `personatune.adapter.rejected` that automations can
follow (prefect.yaml shows one). An event that cannot be sent is logged and never fails a run.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from personatune.bundle import render_release
from personatune.config import from_mapping
from personatune.release import (bundle_rows, champion_bundle, dataset_rows, diff_rows, judge, promote, record,
                                 release_entry)

EVENT_PREFIX = "personatune.adapter"


@task(name="judge")
def judge_challenger(config: dict, eval_dir: str, dataset_dir: str, champion_dir: str | None) -> dict:
    """The verdict (promote or reject, with every check's numbers) and what changed in the data since the champion."""
    cfg = from_mapping(config)
    metrics = json.loads((Path(eval_dir) / "eval.json").read_text())["metrics"]
    verdict = judge(metrics, min_improvement_over_base=cfg.min_improvement_over_base,
                    max_loss_increase=cfg.max_loss_increase, max_similarity_drop=cfg.max_similarity_drop,
                    force=cfg.force_promote)
    rows = dataset_rows(dataset_dir)
    return {"verdict": verdict.to_dict(), "diff": diff_rows(bundle_rows(champion_dir), rows),
            "champion": Path(champion_dir).name if champion_dir else None, "rows": rows}


@task(name="release")
def release_bundle(config: dict, run_dir: str, release: dict) -> dict:
    """Move outputs/latest to the bundle if it was promoted; log the release; emit the event; attach the verdict."""
    cfg = from_mapping(config)
    log = get_run_logger()
    run_dir = Path(run_dir)
    verdict = release["verdict"]
    metrics = json.loads((run_dir / "eval.json").read_text())["metrics"]
    data_sha = json.loads((run_dir / "training_config.json").read_text())["data_sha256"]
    if verdict["promoted"]:
        promote(cfg.output_dir, run_dir.name)
    entry = record(cfg.output_dir, {**release_entry(run_dir.name, data_sha, verdict, metrics, release["diff"]),
                                    "champion": release["champion"]})
    (log.info if verdict["promoted"] else log.warning)("%s: %s", run_dir.name, verdict["reason"])
    emit_release_event(run_dir.name, data_sha, verdict, metrics, release["diff"], release["champion"], log)
    create_markdown_artifact(key="release-verdict", markdown=render_release(release),
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


@task(name="find_champion", retries=2, retry_delay_seconds=[5, 20])
def find_champion(config: dict) -> str | None:
    """The live adapter to beat: outputs/latest; on a fresh worker with `hub_repo` set, the Hub repo's `main`."""
    cfg = from_mapping(config)
    log = get_run_logger()
    local = champion_bundle(cfg.output_dir)
    if local is not None:
        log.info("champion: %s (outputs/latest)", local.name)
        return str(local)
    if cfg.hub_repo:
        from personatune.hub import HubError, HubTransientError, resolve_adapter

        try:
            folder = Path(resolve_adapter(cfg.hub_repo, "main"))
        except HubTransientError:
            raise  # unreachable now: retry, never judge against the base by mistake
        except HubError as e:  # a new repo has no main yet: the first release is judged against the base
            log.info("no champion on %s@main (%s); judging against the base model", cfg.hub_repo, e)
            return None
        if (folder / "adapter_model.safetensors").is_file():
            log.info("champion: %s@main (no local outputs/latest)", cfg.hub_repo)
            return str(folder)
    log.info("no champion yet: the challenger is judged against the base model")
    return None
