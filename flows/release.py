"""Releases: which adapters were trained, which one is live, and the way back to an earlier one.

    python -m flows.release list [--outputs outputs] [--hub-repo you/wednesday-adapter]
    python -m flows.release rollback --to <run> [--outputs outputs] [--hub-repo you/wednesday-adapter]

`list` prints outputs/releases.json (every judged run: promoted or rejected, and rollbacks) and marks the live one
(outputs/latest); with --hub-repo also the repo's `release/<run>` branches and which one `main` holds.
`rollback` makes the bundle of an earlier run the champion again: with --hub-repo the repo's `main` first gets
exactly that release's files (one commit, retried on transient errors), then outputs/latest points at the local
bundle; a release that exists only on the Hub removes outputs/latest, so the next run takes the Hub's main as
its champion. The same is the Prefect flow `rollback`,
deployed from prefect.yaml as `rollback/personatune-release`, so it can be run from the UI. The token for the Hub comes
from HF_TOKEN, the Prefect Secret block `hf-token` or `hf auth login`, as for publishing.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path  # noqa: E402

from prefect import flow, task  # noqa: E402
from prefect.logging import get_run_logger  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from personatune.files import COMPLETE_MARKER  # noqa: E402
from personatune.release import champion_bundle, forget_champion, read_log, rollback  # noqa: E402
from tasks.publish import retry_if_transient, hub_token  # noqa: E402

RELEASE_PREFIX = "release/"


@task(name="rollback_hub", retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_jitter_factor=0.2, retry_condition_fn=retry_if_transient)
def rollback_on_hub(hub_repo: str, run: str) -> dict:
    """One commit on main with exactly the files of release/<run>; retried on 429, 5xx and a moved branch (412)."""
    from personatune.hub import rollback_hub

    token, source = hub_token()
    url, oid = rollback_hub(hub_repo, token, run)
    get_run_logger().info("rolled back %s main to %s%s (token from %s): %s", hub_repo, RELEASE_PREFIX, run, source, url)
    return {"repo": hub_repo, "commit_url": url, "commit_oid": oid}


@flow(name="rollback", flow_run_name="rollback to {to}", log_prints=True)
def rollback_release(to: str, output_dir: str = "outputs", hub_repo: str = "") -> dict:
    """Make an earlier release the champion again, locally (outputs/latest) and, with hub_repo, on the Hub's main.

    Args:
        to: The run to restore (a folder name under output_dir, e.g. 20261129-001234-70af8535), or its Hub branch
            release/<run>.
        output_dir: Where the fine-tune deployment writes bundles and releases.json.
        hub_repo: The Hub repo whose main should hold that release again; empty: local only.
    """
    from prefect.events import emit_event

    log = get_run_logger()
    run = to.removeprefix(RELEASE_PREFIX)
    result: dict = {"run": run, "local": None, "hub": None}
    local = Path(output_dir) / run
    if not hub_repo and not (local / COMPLETE_MARKER).is_file():
        rollback(output_dir, run)  # raises, naming the releases there are
    if hub_repo:  # the Hub first: an unknown release there fails before anything local moves
        result["hub"] = rollback_on_hub(hub_repo, run)
    if (local / COMPLETE_MARKER).is_file():
        entry = rollback(output_dir, run)
        result["local"] = f"{output_dir}/latest -> {run}"
        log.info("rolled back locally: %s (%s)", result["local"], entry["reason"])
    else:  # only on the Hub: the next run must take the Hub's main as its champion, not a stale local one
        forget_champion(output_dir, f"rolled back {hub_repo} main to {RELEASE_PREFIX}{run}, which has no local bundle")
        result["local"] = f"{output_dir}/latest removed (no local bundle of {run}; the Hub's main is the champion)"
        log.info("%s", result["local"])
    try:
        emit_event(event="personatune.adapter.rolled-back",
                   resource={"prefect.resource.id": f"personatune.adapter.{run}", "prefect.resource.name": run},
                   payload=result)
    except Exception as e:  # noqa: BLE001 - an event is a notification, never a reason to fail the rollback
        log.warning("could not emit personatune.adapter.rolled-back: %s", e)
    return result


def format_releases(output_dir: str, hub: list[dict] | None = None) -> str:
    live = champion_bundle(output_dir)
    lines = [f"{'':2}{'run':<28} {'date (UTC)':<20} {'data':<9} {'verdict':<12} {'golden loss':>11} {'similarity':>10}"]
    entries = read_log(output_dir)
    live_line = max((i for i, e in enumerate(entries) if live is not None and e["run"] == live.name), default=None)
    for i, e in enumerate(entries):
        mark = "* " if i == live_line else "  "
        loss = "n/a" if e.get("golden_loss") is None else f"{e['golden_loss']:.4f}"
        sim = "n/a" if e.get("persona_similarity") is None else f"{e['persona_similarity']:.3f}"
        lines.append(f"{mark}{e['run'] or '-':<28} {e['created'][:16].replace('T', ' '):<20} {(e.get('data_sha256') or '')[:8]:<9} "
                     f"{e['verdict']:<12} {loss:>11} {sim:>10}")
    lines.append(f"* = live (outputs/latest -> {live.name if live else 'nothing yet'})")
    if hub is not None:
        lines.append("")
        lines.append("Hub releases (branch, commit, on main):")
        lines += [f"  {h['branch']:<40} {h['commit_oid'][:12]} {'main' if h['is_main'] else ''}" for h in hub]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.release", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("list", "rollback"):
        s = sub.add_parser(name)
        s.add_argument("--outputs", default="outputs", help="Bundle folder (default: outputs).")
        s.add_argument("--hub-repo", default="", help="Also the Hub repo's releases / main.")
        if name == "rollback":
            s.add_argument("--to", required=True, help="Run name (or release/<run>) to make live again.")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            hub = None
            if args.hub_repo:
                from personatune.hub import list_hub_releases

                hub = list_hub_releases(args.hub_repo, hub_token()[0])
            print(format_releases(args.outputs, hub))
        else:
            result = rollback_release(to=args.to, output_dir=args.outputs, hub_repo=args.hub_repo)
            print(f"Rolled back to {result['run']}: " + "; ".join(
                x for x in (result["local"], result["hub"] and f"{result['hub']['repo']} main at {result['hub']['commit_url']}")
                if x))
    except Exception as e:  # noqa: BLE001 - one clear line for the terminal
        print(f"release {args.command} failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
