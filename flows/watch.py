"""Retrain on change: hash the quotes CSV and emit `quotes.csv.changed` when it differs from what was trained.

    python -m flows.watch                          # one check of data/quotes.csv against outputs/latest
    python -m flows.watch --force                  # emit even if this content was already announced
    python -m flows.watch --quotes-csv hf://datasets/you/quotes/quotes.csv      # a Hub dataset repo's main
    python -m flows.watch --quotes-csv s3://bucket/personas/quotes.csv          # an object in a bucket

A URL is checked from metadata only (personatune.sources.describe): for `hf://` the file's blob sha at the
requested revision (and the commit it resolves to), for `s3://` the object's ETag (and VersionId). Nothing is
downloaded: the content is "the trained data" when the run's stage cache (`<output_dir>/.cache/data`) holds
that blob/ETag with the trained sha256. The event's `path` is then the URL pinned to what changed
(`hf://datasets/o/n@<commit sha>/quotes.csv`, `s3://b/k?versionId=<id>` on a versioned bucket), so the
triggered run trains exactly that revision, whatever is pushed meanwhile; `url` and `revision` say the same
apart. On an unversioned bucket no URL names one version: the run reads the object as it is when it starts.

Deployed from prefect.yaml as `watch-quotes/every-5-minutes` (interval schedule, plus manual runs). The
`finetune/personatune` deployment has a trigger on the event and starts a fine-tune with
`quotes_csv` and `output_dir` taken from the event payload.

What counts as "changed":
- The last trained data is the `data_sha256` of the newest run in `<output_dir>/releases.json`, promoted or
  rejected by the release gate (a rejected edit is not retrained every interval; editing the CSV again is), else
  that of the bundle `<output_dir>/latest` points at. A failed run records nothing, so it never moves this hash.
- The CSV's sha256 equal to it: unchanged, nothing is emitted.
- Otherwise the event is emitted once per content: the hash is remembered in the Prefect Variable
  `personatune_quotes_emitted` (a mapping `{absolute csv path: sha256}`, `{url: blob sha or ETag}` for a URL), so a run still queued or
  training, or one that failed validation, is not started again every interval. Editing the CSV again (a new
  hash) or `force=True` emits again.

The watcher only hashes: validation is the fine-tune flow's job, so an invalid CSV starts a run that fails
with the validation error (file, line, column), visible in the UI.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow  # noqa: E402
from prefect.events import emit_event  # noqa: E402
from prefect.logging import get_run_logger  # noqa: E402
from prefect.variables import Variable  # noqa: E402

from personatune.files import COMPLETE_MARKER, sha256_file  # noqa: E402
from personatune.sources import cached_sha256, data_cache, describe, is_remote  # noqa: E402

EVENT = "quotes.csv.changed"
RESOURCE_PREFIX = "personatune.quotes-csv"
EMITTED_VARIABLE = "personatune_quotes_emitted"


def trained_sha256(output_dir: str | Path) -> str | None:
    """The data of the newest judged run (`<output_dir>/releases.json`, promoted or rejected: a rejected CSV was
    trained on and must not be retrained every interval), else of `<output_dir>/latest`, or None."""
    from personatune.release import last_trained_data

    try:
        if (judged := last_trained_data(output_dir)) is not None:
            return judged
    except (OSError, ValueError, KeyError):
        pass
    latest = Path(output_dir) / "latest"
    try:
        if not (latest / COMPLETE_MARKER).is_file():
            return None
        return json.loads((latest / "training_config.json").read_text())["data_sha256"]
    except (OSError, ValueError, KeyError):
        return None


@flow(name="watch-quotes", flow_run_name="watch {quotes_csv}", log_prints=True)
def watch_quotes(quotes_csv: str = "data/quotes.csv", output_dir: str = "outputs", force: bool = False) -> dict:
    """Emit `quotes.csv.changed` (path, sha256, previous sha256, output_dir; for a URL also url, revision,
    content_id) if the CSV differs from the trained data.

    Args:
        quotes_csv: The curated CSV to watch: a local path, hf://datasets/<owner>/<name>[@<revision>]/<file>.csv or s3://<bucket>/<key>.csv (the fine-tune run is started on this path, a URL pinned to the revision that changed).
        output_dir: Where the fine-tune deployment publishes bundles; `<output_dir>/latest` holds the data hash of the last successful training.
        force: Emit even if an event for this exact content was already sent (e.g. to retry after a crash).
    """
    log = get_run_logger()
    out = Path(output_dir).resolve()
    trained = trained_sha256(out)
    if is_remote(quotes_csv):  # metadata only; `version` is the blob sha / ETag, `sha` known if it was downloaded
        from tasks.publish import hub_token

        remote = describe(quotes_csv, hub_token()[0] if quotes_csv.startswith("hf://") else None)
        key, version, sha = quotes_csv, remote.content_id, cached_sha256(remote, data_cache(out))
        target, extra = remote.pinned, {"url": quotes_csv, "revision": remote.revision, "content_id": version}
        label = f"{quotes_csv} (revision {remote.revision or '-'}, {'blob' if remote.dataset else 'ETag'} {version[:12]})"
    else:
        path = Path(quotes_csv).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; nothing to watch")
        key = target = label = str(path)
        version = sha = sha256_file(path)
        extra = {}
    emitted = Variable.get(EMITTED_VARIABLE, default={}) or {}
    result = {"path": target, "sha256": sha, "trained_sha256": trained, "output_dir": str(out), **extra}

    if sha is not None and sha == trained:
        log.info("%s unchanged (sha256 %s is the trained data in %s/latest): nothing to do", label, sha[:12], out)
        return {**result, "status": "unchanged"}
    if emitted.get(key) == version and not force:
        log.info("%s changed (%s) but a fine-tune for this content was already started; "
                 "not starting another (run with force=True to retry)", label, version[:12])
        return {**result, "status": "already-emitted"}

    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"{RESOURCE_PREFIX}.{key}", "prefect.resource.name": key.rsplit("/", 1)[-1]},
        payload={"path": target, "sha256": sha or "", "previous_sha256": trained or "", "output_dir": str(out),
                 "detected_at": dt.datetime.now(dt.timezone.utc).isoformat(), **extra},
    )
    Variable.set(EMITTED_VARIABLE, {**emitted, key: version}, overwrite=True)
    log.info("%s changed: %s (trained: %s); emitted %s (event id %s)", label, version[:12],
             (trained or "none")[:12], EVENT, getattr(event, "id", None))
    return {**result, "status": "emitted", "event_id": str(getattr(event, "id", ""))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.watch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quotes-csv", default="data/quotes.csv")
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    result = watch_quotes(quotes_csv=args.quotes_csv, output_dir=args.output_dir, force=args.force)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
