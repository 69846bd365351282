"""The default run's two scoring stages (base, then the adapter, one shared base as in the flow) timed on this
machine, for an A/B of two checkouts on the same adapter:

    HF_HUB_OFFLINE=1 PYTHONPATH=<checkout> python bench/cpu_scoring.py ADAPTER_DIR --label NAME --out FILE.json

Appends one record (the checkout's commit, each stage's seconds as score_adapter printed them, the wall time of
each stage, every set's loss and similarity, and a hash of the replies) to FILE.json, so two checkouts' records
sit side by side.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir")
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    import personatune
    from personatune.config import FinetuneConfig
    from personatune.evaluate import EvaluationModels, score_adapter
    from personatune.model import resolve_base_model

    checkout = Path(personatune.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(checkout), "log", "--oneline", "-1"], capture_output=True,
                            text=True).stdout.strip()
    cfg = FinetuneConfig()
    resolved = resolve_base_model(cfg.base_model)
    models, tmp = EvaluationModels(), Path(tempfile.mkdtemp())
    record = {"label": args.label, "commit": commit, "checkout": str(checkout), "adapter": args.adapter_dir,
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
              "stages": {}}
    for role, adapter in (("base", None), ("adapter", args.adapter_dir)):
        started = time.perf_counter()
        scores = json.loads((score_adapter(cfg, resolved, adapter, tmp / role, models) / "scores.json").read_text())
        replies = [r["reply"] for s in scores["sets"].values() for r in s["replies"]]
        record["stages"][role] = {
            "wall_s": round(time.perf_counter() - started, 2), "seconds": scores["seconds"],
            "sets": {name: {"loss": s["loss"], "similarity": s["similarity"]} for name, s in scores["sets"].items()},
            "replies_sha256": hashlib.sha256(json.dumps(replies).encode()).hexdigest()}
        print(role, json.dumps(record["stages"][role]))
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(records + [record], indent=1) + "\n")


if __name__ == "__main__":
    main()
