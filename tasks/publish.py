"""The final tasks: assemble the adapter bundle in outputs/<run>/, then push it to the Hugging Face Hub.

`push_to_hub` keeps the bundle local when no repo is configured; otherwise every run lands on its own branch
`release/<run>` and only a promoted one (tasks/release.py) moves `main`. It uses the real `huggingface_hub`
client (personatune/hub.py). The token comes from `HF_TOKEN`, else the Prefect
Secret block named by `PERSONATUNE_HF_TOKEN_BLOCK` (default `hf-token`), else a saved `hf auth login`. It is
read inside the task, never passed as a parameter, and never logged.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.logging import get_run_logger

from personatune.bundle import inline_images, write_bundle
from personatune.config import from_mapping
from personatune.hub import HubTransientError, hub_endpoint, push_release, with_retries
from personatune.release import read_log

TOKEN_BLOCK_ENV = "PERSONATUNE_HF_TOKEN_BLOCK"
DEFAULT_TOKEN_BLOCK = "hf-token"


@task(name="publish", retries=2, retry_delay_seconds=[2, 10])
def publish_bundle(config: dict, run_name: str, adapter_dir: str, eval_dir: str, provenance: dict,
                   release: dict) -> str:
    """Write the bundle atomically (with its verdict, data diff and rows); attach the report as an artifact."""
    run_dir = write_bundle(from_mapping(config), run_name, adapter_dir, eval_dir, provenance,
                           release={k: release[k] for k in ("verdict", "diff", "champion")}, rows=release["rows"])
    # the UI cannot reach the bundle's files: the plot travels inside the artifact
    create_markdown_artifact(key="eval-report", markdown=inline_images((run_dir / "report.md").read_text(), run_dir),
                             description=f"Evaluation of the persona adapter in {run_dir}")
    return str(run_dir)


def hub_token() -> tuple[str | None, str]:
    """(token, where it came from). The source is safe to log; the token is not."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token, "HF_TOKEN"
    block = os.environ.get(TOKEN_BLOCK_ENV, DEFAULT_TOKEN_BLOCK)
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(block).get()
        if value:
            return str(value).strip(), f"Prefect Secret block {block!r}"
    except ValueError:  # no such block
        pass
    except Exception as e:  # noqa: BLE001 - an unreachable API must not hide the other sources
        _logger().warning("could not read Prefect Secret block %r (%s)", block, type(e).__name__)
    from huggingface_hub import get_token

    token = get_token()
    return (token, "saved `hf auth login` token") if token else (None, "nowhere")


def _logger():
    """The run's logger inside a flow or task, a plain one in a CLI (`python -m flows.release list`)."""
    import logging

    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("personatune")


def retry_if_transient(task, task_run, state) -> bool:
    """Retry connection errors, 429 and 5xx; 401/403/404 and configuration problems fail at once (a Prefect
    `retry_condition_fn`, for tasks that leave the waiting to Prefect)."""
    try:
        state.result()
    except HubTransientError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


def _run_label() -> str | None:
    try:
        from prefect.runtime import flow_run

        return f"Prefect flow run {flow_run.name} ({flow_run.id})" if flow_run.id else None
    except Exception:  # noqa: BLE001
        return None


@task(name="push_to_hub")
def push_to_hub(config: dict, run_dir: str, promoted: bool, entry: dict, sleep=time.sleep) -> dict:
    """Push the bundle to its release branch `release/<run>` of `hub_repo`; if it was promoted, `main` too.

    `entry` is this run's line of the release log (recorded after the push): the model card's history shows it.
    Connection errors, 429 and 5xx are retried here (`personatune.hub.with_retries`: 2, 4, 8, 16 s, or the
    Hub's Retry-After when longer), not by Prefect, whose retry delays cannot follow Retry-After; `sleep` is
    how the task waits."""
    cfg = from_mapping(config)
    log = get_run_logger()
    run = Path(run_dir).name
    result = {"status": "", "message": "", "commit_url": None, "repo_id": cfg.hub_repo or None, "branch": None}
    if not cfg.hub_repo:
        result.update(status="local", message=f"kept the bundle local in {run_dir} (no --hub-repo configured)")
        log.info("%s", result["message"])
        return result
    token, source = hub_token()
    log.info("pushing %s to %s at %s (token from %s; repo created %s if missing)", run, cfg.hub_repo,
             hub_endpoint(), source, "private" if cfg.hub_private else "public")
    releases = read_log(cfg.output_dir) + [entry]
    pushed = with_retries(lambda: push_release(run_dir, cfg.hub_repo, token, private=cfg.hub_private,
                                               run_label=_run_label(), promote=promoted, releases=releases),
                          sleep=sleep, log=log.warning)
    where = f"main and {pushed.branch}" if promoted else f"{pushed.branch} only (main keeps the champion)"
    result.update(status="pushed" if promoted else "branch", branch=pushed.branch,
                  commit_url=pushed.main_commit_url or pushed.branch_commit_url,
                  branch_commit_url=pushed.branch_commit_url, main_commit_url=pushed.main_commit_url,
                  branch_commit_oid=pushed.branch_commit_oid, main_commit_oid=pushed.main_commit_oid,
                  message=f"pushed to {pushed.repo_id} {where}: {pushed.main_commit_url or pushed.branch_commit_url}")
    create_link_artifact(key="hub-commit", link=result["commit_url"], link_text=f"{pushed.repo_id}@{pushed.branch}",
                         description=f"Adapter bundle {run} on the Hub ({pushed.endpoint})")
    log.info("%s", result["message"])
    return result
