"""Champion and challenger: which adapter is live, whether a new one may replace it, and the way back.

The champion is the live adapter: locally the bundle `outputs/latest` names (on the Hub, the repo's `main`). A run's
adapter is the challenger. `judge` compares the challenger with the champion (or, for a first release, with the base
model) on the fixed evaluation sets, which an edit to quotes.csv cannot move: golden loss and persona similarity
within tolerances, and no run-on replies. Only a promoted challenger moves `outputs/latest`; every run keeps its
complete bundle and a line in `outputs/releases.json`, so nothing is lost and any release can be made live again.
Plain Python: no Prefect here.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from personatune.bundle import point_latest
from personatune.files import COMPLETE_MARKER

RELEASE_LOG = "releases.json"
ROWS_FILE = "data_rows.json"
DIFF_SAMPLES = 3


@dataclass(frozen=True)
class Check:
    metric: str
    challenger: float | None
    reference: float | None  # the champion's (or base's) value
    limit: float | None      # the worst value that still passes
    passed: bool
    text: str


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    against: str              # "champion" or "base"
    checks: list[Check] = field(default_factory=list)
    forced: bool = False

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def reason(self) -> str:
        """One line: what decided it, with the numbers."""
        if self.failed and self.forced:
            return "promoted by --force-promote although " + "; ".join(c.text for c in self.failed)
        if self.failed:
            return f"rejected against the {self.against}: " + "; ".join(c.text for c in self.failed)
        return f"promoted over the {self.against}: " + "; ".join(c.text for c in self.checks)

    def to_dict(self) -> dict:
        return {"promoted": self.promoted, "against": self.against, "forced": self.forced, "reason": self.reason,
                "checks": [asdict(c) for c in self.checks]}


def judge(metrics: dict, *, min_improvement_over_base: float = 0.0, max_loss_increase: float = 0.005,
          max_similarity_drop: float = 0.02, force: bool = False, identical_to: str | None = None) -> Verdict:
    """Promote or reject the challenger. `metrics` is eval.json's "metrics": base, challenger, champion (if any).

    `identical_to` names a champion whose adapter has the challenger's exact bytes (an unchanged re-run): nothing
    to compare, the same adapter stays live."""
    new, champion, base = metrics["challenger"], metrics.get("champion"), metrics["base"]
    if identical_to:
        return Verdict(True, "champion", [Check("adapter", None, None, None, True,
                                                f"the adapter is byte-identical to the champion {identical_to}'s")])
    checks = []
    if champion:
        old = champion["golden_loss"]
        limit = old * (1 + max_loss_increase)
        checks.append(Check("golden_loss", new["golden_loss"], old, limit, new["golden_loss"] <= limit,
                            f"golden loss {new['golden_loss']:.4f} vs champion {old:.4f} "
                            f"({new['golden_loss'] / old - 1:+.1%}, tolerance +{max_loss_increase:.1%})"))
        if new["persona_similarity"] is None or champion["persona_similarity"] is None:
            checks.append(Check("persona_similarity", None, None, None, True,
                                "persona similarity skipped (--no-persona-similarity): not part of this verdict"))
        else:
            old = champion["persona_similarity"]
            limit = old - max_similarity_drop
            checks.append(Check("persona_similarity", new["persona_similarity"], old, limit,
                                new["persona_similarity"] >= limit,
                                f"persona similarity {new['persona_similarity']:.3f} vs champion {old:.3f} "
                                f"({new['persona_similarity'] - old:+.3f}, tolerance -{max_similarity_drop:.3f})"))
    else:
        old = base["golden_loss"]
        limit = old * (1 - min_improvement_over_base)
        checks.append(Check("golden_loss", new["golden_loss"], old, limit, new["golden_loss"] < limit,
                            f"golden loss {new['golden_loss']:.4f} vs base {old:.4f} "
                            f"({new['golden_loss'] / old - 1:+.1%}, needs below -{min_improvement_over_base:.1%})"))
    checks.append(Check("run_on_rate", new["run_on_rate"], 0.0, 0.0, new["run_on_rate"] == 0.0,
                        f"run-on rate {new['run_on_rate']:.1%} (must be 0%)"))
    passed = all(c.passed for c in checks)
    return Verdict(passed or force, "champion" if champion else "base", checks, forced=force and not passed)


# --- what changed in the data ---------------------------------------------------------------------------------
def dataset_rows(dataset_dir: str | Path) -> list[dict]:
    """The rows a run trained (and was held out) on, from its saved DatasetDict: instruction, user, response, split."""
    from datasets import load_from_disk

    dsd = load_from_disk(str(dataset_dir))
    return [{"instruction": i, "user": u, "response": r, "split": split}
            for split in dsd for i, u, r in zip(dsd[split]["instruction"], dsd[split]["user"], dsd[split]["response"])]


def diff_rows(old: list[dict] | None, new: list[dict], samples: int = DIFF_SAMPLES) -> dict | None:
    """Rows added, removed and edited (same instruction + user, another response) from `old` to `new`."""
    if old is None:
        return None
    before = {(r["instruction"], r["user"]): r["response"] for r in old}
    after = {(r["instruction"], r["user"]): r["response"] for r in new}
    added = [k for k in after if k not in before]
    removed = [k for k in before if k not in after]
    edited = [k for k in after if k in before and after[k] != before[k]]
    return {
        "added": len(added), "removed": len(removed), "edited": len(edited),
        "unchanged": len(after) - len(added) - len(edited),
        "samples": {
            "added": [{"user": k[1], "response": after[k]} for k in added[:samples]],
            "removed": [{"user": k[1], "response": before[k]} for k in removed[:samples]],
            "edited": [{"user": k[1], "before": before[k], "after": after[k]} for k in edited[:samples]],
        },
    }


def bundle_rows(bundle: str | Path | None) -> list[dict] | None:
    path = Path(bundle) / ROWS_FILE if bundle else None
    return json.loads(path.read_text()) if path and path.is_file() else None


# --- the local release log and the champion pointer ------------------------------------------------------------
def champion_bundle(outputs: str | Path) -> Path | None:
    """The live bundle (outputs/latest), or None before the first promotion."""
    link = Path(outputs) / "latest"
    return link.resolve() if link.exists() and (link / COMPLETE_MARKER).is_file() else None


@contextmanager
def _locked(outputs: Path):
    outputs.mkdir(parents=True, exist_ok=True)
    with open(outputs / ".releases.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs finishing together must not lose each other's line
        yield


def read_log(outputs: str | Path) -> list[dict]:
    path = Path(outputs) / RELEASE_LOG
    return json.loads(path.read_text())["releases"] if path.is_file() else []


def _write_log(outputs: Path, entries: list[dict]) -> None:
    tmp = outputs / f".{RELEASE_LOG}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"releases": entries}, indent=2) + "\n")
    os.replace(tmp, outputs / RELEASE_LOG)  # readers see the old or the new log, never half of one


def record(outputs: str | Path, entry: dict) -> dict:
    """Append one line to outputs/releases.json (atomically, under a lock)."""
    outputs = Path(outputs)
    entry = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **entry}
    with _locked(outputs):
        _write_log(outputs, read_log(outputs) + [entry])
    return entry


def update_last(outputs: str | Path, run: str, **changes) -> None:
    """Add fields (e.g. where the Hub push landed) to the newest line of `run`."""
    outputs = Path(outputs)
    with _locked(outputs):
        entries = read_log(outputs)
        for entry in reversed(entries):
            if entry["run"] == run:
                entry.update(changes)
                break
        _write_log(outputs, entries)


def release_entry(run: str, data_sha256: str, verdict: dict, metrics: dict, diff: dict | None) -> dict:
    """The release log's line for a judged run (`verdict` as Verdict.to_dict() gives it)."""
    new = metrics["challenger"]
    return {"run": run, "data_sha256": data_sha256, "verdict": "promoted" if verdict["promoted"] else "rejected",
            "forced": verdict["forced"], "against": verdict["against"], "reason": verdict["reason"],
            "golden_loss": new["golden_loss"], "persona_similarity": new["persona_similarity"],
            "diff": {k: diff[k] for k in ("added", "removed", "edited", "unchanged")} if diff else None}


def promote(outputs: str | Path, run: str) -> None:
    point_latest(Path(outputs), run)


def rollback(outputs: str | Path, to: str) -> dict:
    """Make the bundle outputs/<to> the champion again; returns the log line written."""
    outputs = Path(outputs)
    bundle = outputs / to
    if not (bundle / COMPLETE_MARKER).is_file():
        known = ", ".join(e["run"] for e in read_log(outputs)) or "none"
        raise FileNotFoundError(f"no complete bundle {bundle} to roll back to (releases: {known})")
    tc = json.loads((bundle / "training_config.json").read_text())  # read everything before anything moves
    card = json.loads((bundle / "eval.json").read_text()).get("metrics", {}).get("challenger", {})
    previous = champion_bundle(outputs)
    entry = {"run": to, "data_sha256": tc.get("data_sha256"), "verdict": "rolled back",
             "reason": f"rolled back from {previous.name if previous else 'no champion'}",
             "golden_loss": card.get("golden_loss"), "persona_similarity": card.get("persona_similarity")}
    with _locked(outputs):
        promote(outputs, to)
        entry = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **entry}
        _write_log(outputs, read_log(outputs) + [entry])
    return entry


def forget_champion(outputs: str | Path, reason: str) -> dict:
    """No local champion any more (a rollback made a release live that exists only on the Hub): the next run
    takes the Hub's main as its champion. Records why."""
    outputs = Path(outputs)
    previous = champion_bundle(outputs)
    with _locked(outputs):
        (outputs / "latest").unlink(missing_ok=True)
        entry = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "run": previous.name if previous else None, "verdict": "unset", "reason": reason}
        _write_log(outputs, read_log(outputs) + [entry])
    return entry


def promote_and_record(outputs: str | Path, run: str, entry: dict, judged_against: str | None) -> dict:
    """Record the judged run and, if it was promoted, point outputs/latest at it, atomically with respect to other
    runs and rollbacks: if the champion changed while this run trained (another run promoted, a rollback), the
    verdict no longer holds and the run is recorded as rejected instead."""
    outputs = Path(outputs)
    with _locked(outputs):
        live = champion_bundle(outputs)
        if entry["verdict"] == "promoted" and (live.name if live else None) != judged_against:
            entry = {**entry, "verdict": "rejected", "reason": f"rejected: the champion changed during the run (judged "
                     f"against {judged_against or 'the base'}, now {live.name if live else 'none'}); run it again"}
        if entry["verdict"] == "promoted":
            promote(outputs, run)
        entry = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **entry}
        _write_log(outputs, read_log(outputs) + [entry])
    return entry


def last_trained_data(outputs: str | Path) -> str | None:
    """The data hash of the newest run, promoted or not (what the CSV watcher compares with)."""
    runs = [e for e in read_log(outputs) if e.get("verdict") in ("promoted", "rejected") and e.get("data_sha256")]
    return runs[-1]["data_sha256"] if runs else None
