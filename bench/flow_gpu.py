#!/usr/bin/env python3
"""The whole flow on one GPU, per stage, uncapped and on emulated smaller cards (issue 18: "every card from 6 GiB
up finishes the flow", "a fast whole flow").

    python bench/bench.py prepare                  # here, once: bench/.assets (tokenizer + metadata)
    ../shared/tools/device-wheels.sh --flow        # here, once: .whl/ (Prefect, pandera, bitsandbytes, datasets)
    # on the GPU machine (device tool; carry [".whl", "bench/.assets"]):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD && python3 bench/flow_gpu.py --caps none,24,16,12,8,6

For each cap it runs `python -m flows.finetune` (the command a user types) in a fresh output folder and Prefect
home, pinned to GPU 0, one epoch of data/quotes.csv, with the Llama-2-7B-shaped random-weight model of
bench/bench.py as `--base-model`. A cap of N GiB sets PERSONATUNE_GPU_MEMORY_GIB=N: the plan is sized for an N GiB
card and every process that loads a model onto the card is held to N GiB (personatune.speedups.enforce_memory_cap),
so allocations past it raise a real CUDA out-of-memory error. Per stage: the time from the previous task run's
end to this one's (the flow's tasks run one after another), read from the Prefect log's timestamps; start-up is
process start to the flow run's first line. Prints a table; the raw record (commands, every stage, layouts, the
out-of-memory retries, the last lines of a failed run) goes to bench/results/ and to $OUT when set.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d\d\d) \| \w+\s*\| (.*)$")
TASK_DONE = re.compile(r"Task run '([^']+)' - Finished in state (\w+)")
STAGES = ("validate", "tokenize", "build_model", "train", "score", "evaluate")


def stage_of(task: str) -> str:
    for stage in STAGES:
        if task == stage or task.startswith(stage + "-"):
            return stage
    return "publish"  # resolve/judge/publish/push/release: bookkeeping around the stages


def stage_times(lines: list[str], started: float) -> dict:
    """Seconds per stage from the Prefect log: each task run's end minus the previous one's (the flow's tasks run
    one after another). `started` is the process start (epoch seconds); log times are local wall-clock times."""
    day = dt.datetime.fromtimestamp(started).date()
    stamps = []
    for line in lines:
        m = LOG_LINE.match(line)
        if m:
            t = dt.datetime.combine(day, dt.time.fromisoformat(m.group(1))).timestamp()
            stamps.append((t if t >= started - 60 else t + 86400, m.group(2)))
    if not stamps:
        return {}
    # start-up ends where the flow run begins: imports, then the temporary Prefect API server (its own log line
    # comes before the flow's first; counting from there would put the server's start into the first task)
    begin = next((t for t, text in stamps if "Beginning flow run" in text), stamps[0][0])
    out: dict = {"start-up": begin - started}
    prev = begin
    for t, text in stamps:
        if t < begin:
            continue
        m = TASK_DONE.search(text)
        if m:
            stage = stage_of(m.group(1))
            out[stage] = out.get(stage, 0.0) + (t - prev)
            prev = t
    out["publish"] = out.get("publish", 0.0) + (stamps[-1][0] - prev)  # after the last task: summary, flow end
    return {k: round(v, 2) for k, v in out.items()}


def gpu_memory_used() -> dict[str, int]:
    """MiB in use on each GPU of the host (nvidia-smi; all of them, whatever CUDA_VISIBLE_DEVICES says)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {i.strip(): int(m) for i, m in (line.split(",") for line in out.splitlines() if "," in line)}


def run_name(cap: float | None, num_gpus: int) -> str:
    """The run's folder under --dir and its name in the record: cap8, uncapped, uncapped-2gpu."""
    return (f"cap{cap:g}" if cap else "uncapped") + (f"-{num_gpus}gpu" if num_gpus != 1 else "")


def run_flow(model_dir: Path, work: Path, cap: float | None, epochs: float, timeout: int, num_gpus: int = 1,
             devices: str | None = "0", quotes_csv: Path | None = None, profile: Path | None = None,
             prefect_home: Path | None = None) -> dict:
    """One `python -m flows.finetune`. devices: CUDA_VISIBLE_DEVICES for the process (None: unset, the flow pins
    the GPUs itself). While it runs, nvidia-smi is read every 2 s: the peak memory each GPU of the host held
    beyond what it held before the run shows which GPUs the run used. profile: run it under cProfile, the stats
    written there (the flow's tasks run in its main thread, so the profile covers every stage). prefect_home: the
    Prefect home to use (default: a new one in the run's folder, as on a machine's first run)."""
    name = run_name(cap, num_gpus)
    out_dir, home = work / name / "outputs", prefect_home or work / name / "prefect"
    home.mkdir(parents=True, exist_ok=True)  # Prefect does not create its home (its SQLite file would fail to open)
    cmd = [sys.executable, *(["-m", "cProfile", "-o", str(profile)] if profile else []), "-m", "flows.finetune",
           "--base-model", str(model_dir), "--no-persona-similarity", "--epochs", str(epochs), "--output-dir",
           str(out_dir), "--num-gpus", str(num_gpus)]
    if quotes_csv:
        cmd += ["--quotes-csv", str(quotes_csv)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # the temporary API server, as a fresh `python -m flows.finetune` gets it (an
    # empty PREFECT_API_URL made Prefect's event worker log "Cannot put items in a stopped service instance" errors)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    env.pop("PERSONATUNE_GPU_MEMORY_GIB", None)
    if cap:
        env["PERSONATUNE_GPU_MEMORY_GIB"] = f"{cap:g}"
    from personatune.config import FinetuneConfig
    from personatune.files import is_complete
    from personatune.model import quantized_copy_dir

    # load_base_model's kept 4-bit copy of the base (keep_quantized_base), for the flow's default compute dtype
    copy_dir = quantized_copy_dir(str(model_dir.resolve()), FinetuneConfig(base_model=str(model_dir)))
    copy_before = is_complete(copy_dir)
    before, peak = gpu_memory_used(), {}
    started = time.time()
    with open(work / f"{name}.log", "w+") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        while p.poll() is None and time.time() - started < timeout:
            for gpu, used in gpu_memory_used().items():
                peak[gpu] = max(peak.get(gpu, 0), used - before.get(gpu, 0))
            time.sleep(2)
        if p.poll() is None:
            p.kill()
            p.wait()
            rc = "timeout"
        else:
            rc = p.returncode
        log.seek(0)
        text = log.read()
    wall = time.time() - started
    lines = text.splitlines()
    copy = "existing" if copy_before else "written by this run" if is_complete(copy_dir) else "none"
    return {"name": name, "cap_gib": cap, "num_gpus": num_gpus, "command": " ".join(cmd), "env": {k: env[k] for k in (
                "CUDA_VISIBLE_DEVICES", "PERSONATUNE_GPU_MEMORY_GIB") if k in env},
            "quantized_copy": copy, "gpu_mib_peak_over_before": peak, "gpus_used": sorted(g for g, m in peak.items() if m > 1024),
            "train_steps": [l.strip() for l in lines if "Training layout: " not in l and "'train_runtime'" in l][-1:],
            "returncode": rc, "ok": rc == 0, "process_s": round(wall, 2), "stages_s": stage_times(lines, started),
            "layouts": [l.split("Training layout: ", 1)[1] for l in lines if "Training layout: " in l],
            "oom_retries": [l for l in lines if "CUDA out of memory with" in l],
            "train_memory": [l.split("Training memory: ", 1)[1] for l in lines if "Training memory: " in l],
            "tail": lines[-40:] if rc != 0 else [l for l in lines if "Verdict:" in l or "Golden loss" in l],
            "timings": [l.split("Timing: ", 1)[1] for l in lines if "Timing: " in l]}


def profile_summary(prof: Path, limit: int = 45) -> str:
    """The cProfile stats as text: the calls with the most cumulative time, then the most own time."""
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf).strip_dirs()
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    return buf.getvalue()


def startup_profile(work: Path) -> dict:
    """Where the flow's start-up goes on this machine: `python -X importtime -c "import flows.finetune"` (the
    slowest imports, cumulative) and the temporary Prefect API server's start alone (a fresh Prefect home, so its
    database is created as in a first run)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    started = time.time()
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import flows.finetune"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    imports_s = time.time() - started
    rows = []
    for line in p.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]) / 1e6, parts[2].rstrip()))
    home = work / "startup-prefect"
    home.mkdir(parents=True, exist_ok=True)
    code = ("import time; t = time.time(); from prefect.server.api.server import SubprocessASGIServer; "
            "s = SubprocessASGIServer(); s.start(); print(round(time.time() - t, 2)); s.stop()")
    started = time.time()
    q = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**env, "PREFECT_HOME": str(home)})
    return {"import_flows_finetune_s": round(imports_s, 2), "returncode": p.returncode,
            "slowest_imports_cumulative_s": [(round(t, 2), name) for t, name in sorted(rows, reverse=True)[:25]],
            "temporary_server_s": q.stdout.strip().splitlines()[-1:] or q.stderr[-500:],
            "temporary_server_process_s": round(time.time() - started, 2)}


def table(results: list[dict]) -> str:
    cols = ("start-up", "validate", "tokenize", "build_model", "train", "score", "evaluate", "publish")
    rows = ["| card | result | process s | " + " | ".join(cols) + " | OOM retries | layout (last) |",
            "|---|---|---:|" + "---:|" * len(cols) + "---:|---|"]
    for r in results:
        s = r["stages_s"]
        rows.append(f"| {r['name']} | {'ok' if r['ok'] else 'FAILED (' + str(r['returncode']) + ')'} | {r['process_s']:.0f} | "
                    + " | ".join(f"{s[c]:.1f}" if c in s else "-" for c in cols)
                    + f" | {len(r['oom_retries'])} | {(r['layouts'] or ['-'])[-1][:90]} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", default="none,24,16,12,8,6", help="GiB per run, comma-separated; 'none' = uncapped")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole list (e.g. 2 for item 5's two runs)")
    ap.add_argument("--dir", default="/tmp/personatune-flow-gpu")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per flow run")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="also write the raw JSON here (default $OUT)")
    ap.add_argument("--num-gpus", type=int, default=1, help="the flow's --num-gpus")
    ap.add_argument("--devices", default="0",
                    help="CUDA_VISIBLE_DEVICES of the flow process; 'unset' leaves it unset (the flow pins GPUs itself)")
    ap.add_argument("--csv-repeat", type=int, default=1,
                    help="train on data/quotes.csv repeated this many times (copy k's user text ends in ' (k)')")
    ap.add_argument("--tag", default="", help="added to the result file's name (runs in parallel on other GPUs)")
    ap.add_argument("--shared-prefect-home", action="store_true",
                    help="one Prefect home for every run: the first run creates its database, later runs find it "
                         "(a user's second run); default: a new home per run")
    ap.add_argument("--cprofile", action="store_true",
                    help="run each flow under cProfile; the stats summary goes to <dir>/<run>.prof.txt and $OUT")
    ap.add_argument("--startup-profile", action="store_true",
                    help="first record where start-up goes: slowest imports and the temporary API server alone")
    args = ap.parse_args()

    import torch

    import bench  # bench/bench.py: the 7B-shaped model builder

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "llama2-7b-shaped"
    built = bench.build_shaped_model(model_dir)
    caps = [None if c.strip() in ("none", "0", "") else float(c) for c in args.caps.split(",")]
    record = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": dt.date.today().isoformat(),
              "model": "Llama-2-7B-shaped, random weights (bench/bench.py build_shaped_model)", "built": built,
              "epochs": args.epochs, "runs": []}
    del torch
    quotes = repeated_csv(ROOT / "data" / "quotes.csv", work / f"quotes_x{args.csv_repeat}.csv", args.csv_repeat)
    record.update(num_gpus=args.num_gpus, devices=args.devices, csv_repeat=args.csv_repeat, host_gpus=gpu_memory_used())
    name = f"flow_gpu_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}{('_' + args.tag) if args.tag else ''}.json"
    if args.startup_profile:
        record["startup_profile"] = startup_profile(work)
        print("start-up profile: " + json.dumps(record["startup_profile"], indent=1), flush=True)
    for run in range(args.runs):
        for cap in caps:
            rname, first = run_name(cap, args.num_gpus), run == 0 and cap == caps[0]
            shutil.rmtree(work / rname, ignore_errors=True)  # no cache between runs
            prof = work / f"{rname}-run{run + 1}.prof" if args.cprofile else None
            home = work / "prefect-shared" if args.shared_prefect_home else None
            if home and first:
                shutil.rmtree(home, ignore_errors=True)
            r = run_flow(model_dir, work, cap, args.epochs, args.timeout, args.num_gpus,
                         None if args.devices == "unset" else args.devices, quotes, prof, home)
            r["prefect_home"] = "shared, existing" if home and not first else "new"
            r["run"] = run + 1
            if args.out:  # the whole log beside the record
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / f"{rname}-run{run + 1}.log").write_text((work / f"{rname}.log").read_text())
            if prof and prof.is_file():
                summary = profile_summary(prof)
                for folder in filter(None, (work, args.out and Path(args.out))):
                    (folder / f"{prof.name}.txt").write_text(summary)
            record["runs"].append(r)
            print(f"{r['name']} (run {run + 1}): {'ok' if r['ok'] else 'FAILED'} in {r['process_s']:.0f} s, "
                  f"stages {r['stages_s']}, OOM retries {len(r['oom_retries'])}, GPUs used {r['gpus_used']} "
                  f"(MiB over idle: {r['gpu_mib_peak_over_before']}), layouts {r['layouts']}", flush=True)
            if not r["ok"]:
                print("\n".join(r["tail"][-15:]), flush=True)
            bench.save_result(record, name, args.results, args.out)
    record["table"] = text = (f"### Whole flow on {args.num_gpus} x {record['card']}, {record['date']} (`bench/flow_gpu.py`)\n\n"
            + table(record["runs"]))
    print("\n" + text)
    for path in bench.save_result(record, name, args.results, args.out):
        print(f"raw results: {path}")


def repeated_csv(source: Path, target: Path, times: int) -> Path | None:
    """`source` repeated `times` times as one CSV (None for 1: the shipped file). Copy k > 0 of each row has ' (k)'
    after its user text, so no row duplicates another (the validator rejects duplicates)."""
    if times <= 1:
        return None
    import pandas as pd

    df = pd.read_csv(source, dtype=str, keep_default_na=False)
    copies = [df] + [df.assign(user=df["user"] + f" ({k})") for k in range(1, times)]
    pd.concat(copies, ignore_index=True).to_csv(target, index=False)
    return target


if __name__ == "__main__":
    main()
