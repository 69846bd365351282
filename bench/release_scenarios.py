#!/usr/bin/env python3
"""The release gate on the full default recipe: good data goes live, damaged data does not, rollback restores.

    python bench/release_scenarios.py [--work /tmp/scenarios] [--out bench/results/release_scenarios.json]

Runs `python -m flows.finetune` (the defaults: the embedded model, the shipped recipe) as a user would, one after
the other into one output folder, each pushing to a Hub repo on the local Hub-protocol server (tests/hub_server.py,
spoken to by the real huggingface_hub client):
  1. shipped       data/quotes.csv                                         -> the first champion
  2. shifted       the same rows with the response column shifted by one row (each reply paired with the next
                   row's prompt)                                           -> must be rejected
  3. cheerful      data/quotes.csv + 150 cheerful, off-persona rows (bench/data/cheerful_rows.csv) -> rejected
  4. good edit     data/quotes.csv + 60 new in-character rows (bench/data/good_edit_rows.csv)      -> promoted
  5. `python -m flows.release rollback --to shipped` -> outputs/latest and the Hub's main hold run 1 again
Records each run's verdict, the three-way metrics, the data diff, where outputs/latest and the Hub's main point,
and wall time. `--reuse-cache DIR` copies a previous output folder's stage cache in first (same code and data:
the first run's stages are cache hits).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REPO = "you/wednesday-adapter"


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["instruction", "user", "response"])
        w.writerows(rows)
    return path


def datasets(work: Path) -> dict[str, Path]:
    shipped = [r for r in csv.reader(open(ROOT / "data/quotes.csv", encoding="utf-8"))][1:]
    shifted = [[i, u, shipped[(n + 1) % len(shipped)][2]] for n, (i, u, _) in enumerate(shipped)]
    extra = lambda name: [r for r in csv.reader(open(ROOT / "bench/data" / name, encoding="utf-8"))][1:]  # noqa: E731
    return {"shipped": write(work / "shipped.csv", shipped), "shifted": write(work / "shifted.csv", shifted),
            "cheerful": write(work / "cheerful.csv", shipped + extra("cheerful_rows.csv")),
            "good-edit": write(work / "good_edit.csv", shipped + extra("good_edit_rows.csv"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/personatune-scenarios")
    ap.add_argument("--out", default=str(ROOT / "bench/results/release_scenarios.json"))
    ap.add_argument("--reuse-cache", default="")
    ap.add_argument("--flow-args", default="", help="extra flags for every `python -m flows.finetune` run")
    ap.add_argument("--keep-cache", action="store_true",
                    help="keep --work's stage cache (same CSV paths: cache hits), start with no bundles or releases")
    args = ap.parse_args()

    from tests.hub_server import HubServer

    work = Path(args.work)
    out = work / "outputs"
    if args.keep_cache and (out / ".cache").is_dir():
        for path in [*work.iterdir(), *out.iterdir()]:
            if path not in (out, out / ".cache"):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    else:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.reuse_cache:
        shutil.copytree(Path(args.reuse_cache) / ".cache", out / ".cache")
    csvs = datasets(work)
    token = "hf_bench_" + secrets.token_hex(8)
    results: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "runs": []}
    with HubServer(tokens={token: "you"}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
               "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PYTHONUNBUFFERED": "1"}

        def main_adapter() -> str | None:
            files = hub.repos[REPO].resolve("main").files if REPO in hub.repos else {}
            data = files.get("adapter_model.safetensors")
            return hashlib.sha256(data).hexdigest() if data else None

        for name, path in csvs.items():
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "flows.finetune", "--quotes-csv", str(path), "--output-dir",
                                   str(out), "--run-name", name, "--hub-repo", REPO, *args.flow_args.split()],
                                  cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            elapsed = time.time() - t0
            (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            bundle = out / name
            release = json.loads((bundle / "release.json").read_text())
            ev = json.loads((bundle / "eval.json").read_text())
            summary = proc.stdout[proc.stdout.find("Verdict:"):].split("\n\n")[0]
            results["runs"].append({
                "run": name, "wall_s": round(elapsed, 1), "verdict": release["verdict"], "diff": release["diff"] and
                {k: release["diff"][k] for k in ("added", "removed", "edited", "unchanged")},
                "metrics": ev["metrics"], "latest": (out / "latest").resolve().name if (out / "latest").exists() else None,
                "hub_main_adapter_sha256": main_adapter(), "adapter_sha256": sha(bundle / "adapter_model.safetensors"),
                "summary": summary[:2000]})
            print(f"{name}: {release['verdict']['reason']} ({elapsed:.0f} s)", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "flows.release", "rollback", "--to", "shipped", "--outputs", str(out),
                               "--hub-repo", REPO], cwd=ROOT, env=env, capture_output=True, text=True)
        from huggingface_hub import snapshot_download

        main = Path(snapshot_download(REPO, endpoint=hub.url, token=token, cache_dir=work / "hf"))
        results["rollback"] = {"returncode": proc.returncode, "output": proc.stdout[-1000:],
                               "wall_s": round(time.time() - t0, 1), "latest": (out / "latest").resolve().name,
                               "hub_main_adapter_sha256": sha(main / "adapter_model.safetensors"),
                               "shipped_adapter_sha256": sha(out / "shipped" / "adapter_model.safetensors")}
        listing = subprocess.run([sys.executable, "-m", "flows.release", "list", "--outputs", str(out), "--hub-repo", REPO],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
        results["release_list"] = listing.stdout
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(results["release_list"])


if __name__ == "__main__":
    main()
