#!/usr/bin/env python3
"""Tokens/s of QLoRA training on 1 vs N GPUs of one host, in one run, and the loss curves of both.

    python bench/bench.py prepare                                   # here, once (bench/.assets)
    python3 bench/multi_gpu.py run --gpus 2      # on a 2-GPU machine (carry .whl, bench/.assets): prints the table,
                                                 # raw JSON to bench/results/ (and $OUT when set); --write BENCHMARKS.md
    python3 bench/multi_gpu.py sweep --gpus 2 --variants 1gpu,ddp,ddp-log1   # 1 GPU, then one N-GPU run per variant

Same setup as bench/bench.py (Llama-2-7B-shaped model with random weights, data/quotes.csv tokenized by the
project, repeated), same GPU-default profile on every card. 1 GPU: `bench.py _variant gpu` in one process
(CUDA_VISIBLE_DEVICES=0). N GPUs: `personatune.distributed.launch` (torchrun, as the flow) starts N ranks; each
runs the same instrumented variant through `personatune.train_rank.train_on_rank` (GPU pinning, DDP, barrier,
rank 0 writes), passed to `bench.variant` as its training function: the same public seams the flow uses.
Each GPU keeps the profile's micro-batch (16 examples), so an N-GPU optimizer step takes N x 16 examples.
tokens/s = real tokens of all ranks in the timed steps / rank 0's time for them.
Loss: the Trainer's logged loss per optimizer step (the mean over ranks on N GPUs), compared (a) at the same
optimizer step and (b) at the same number of examples seen (N-GPU step k vs 1-GPU step N*k).
`--check-launcher` also runs `train_distributed` (what the flow's training task calls) for a few steps and checks
that rank 0 wrote the adapter.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench as single  # noqa: E402  (bench/bench.py)


def rank_main(args) -> None:
    """One rank: bench.py's instrumented `gpu` variant, trained by `train_on_rank` (a DDP rank of the recipe)."""
    import functools

    import ddp_variants  # bench/ddp_variants.py
    from personatune.train_rank import train_on_rank

    settings = json.loads(args.ddp or "{}")  # the variant's DDP settings
    rank = int(os.environ.get("RANK", 0))
    kept = Path(args.dir) / "runs" / f"{args.name}.rank{rank}" / "adapter"  # ranks > 0 keep their history here
    # a complete folder from an earlier run in the same --dir would be taken as done, and the rank would not train
    shutil.rmtree(kept.parent, ignore_errors=True)
    single.variant(argparse.Namespace(name=args.name, variant="gpu", dir=args.dir, steps=args.steps, warmup=args.warmup),
                   train=functools.partial(train_on_rank, rank_adapter_dir=kept),
                   plan_over={"logging_steps": settings["logging_steps"]} if "logging_steps" in settings else None,
                   arguments=ddp_variants.arguments(settings), trainer_class=ddp_variants.trainer_class(settings))


def rank_lines(argv: list[str], n: int, timeout: float) -> dict[int, dict]:
    """Run `multi_gpu.py _rank ...` on n GPUs under torchrun; each rank's RESULT line."""
    from personatune.distributed import launch, visible_device_ids

    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "RESULT " not in line and ("Error" in line or "error" in line or "Training layout" in line):
            print(line, flush=True)

    launch([str(Path(__file__).resolve()), "_rank"] + argv, n, log=log, devices=visible_device_ids()[:n],
           env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, silence_timeout_s=timeout)
    ranks = {}
    for line in lines:
        tag, _, text = line.partition("] ")
        if text.startswith("RESULT ") and tag.startswith("[rank "):
            ranks[int(tag.removeprefix("[rank "))] = json.loads(text[7:])
    return ranks


def compare(one: dict, many: dict, n: int) -> dict:
    a, b = one["losses"], many["losses"]
    same_step = [abs(y - x) / x for x, y in zip(a, b)]
    same_examples = [(k + 1, a[n * (k + 1) - 1], b[k]) for k in range(len(b)) if n * (k + 1) <= len(a)]
    k = min(5, len(a), len(b))
    last = abs(sum(b[-k:]) / k - sum(a[-k:]) / k) / (sum(a[-k:]) / k)
    return {"steps_compared": len(same_step), "max_rel_diff_same_step": max(same_step), "last_k": k,
            "mean_last_k_rel_diff_same_step": last,
            "final_rel_diff_same_step": same_step[-1],
            "same_examples": [(k, x, y, abs(y - x) / x) for k, x, y in same_examples]}


def _prepare(args):
    """Shared by `run` and `sweep`: check the GPUs, tokenize and build the bench model once (bench.py _setup)."""
    from personatune.distributed import visible_gpus

    n = args.gpus
    assert visible_gpus() >= n, f"need {n} GPUs, see {visible_gpus()}"
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    env = single.bench_env()
    bench_py = [sys.executable, str(ROOT / "bench" / "bench.py")]
    t = time.time()
    setup = single.run_setup(work, args.examples, env)
    return n, work, env, bench_py, setup, t


def run(args) -> None:
    import torch

    n, work, env, bench_py, setup, t = _prepare(args)
    print(f"setup {time.time() - t:.0f} s: {json.dumps(setup)}", flush=True)
    steps = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.profile_steps:  # after the timed steps, every run (and rank) profiles that many more (bench.step_profile)
        os.environ["PERSONATUNE_BENCH_PROFILE_STEPS"] = env["PERSONATUNE_BENCH_PROFILE_STEPS"] = str(args.profile_steps)

    t = time.time()
    if args.one_via_torchrun:  # 1 GPU through the launcher of the N-GPU runs (torchrun --nproc-per-node 1)
        one = rank_lines(["--name", "gpu-ddp1", "--dir", str(work)] + steps, 1, args.timeout)[0]
    else:
        p = subprocess.run(bench_py + ["_variant", "gpu", "--dir", str(work)] + steps, text=True, capture_output=True,
                           env={**env, "CUDA_VISIBLE_DEVICES": "0"}, timeout=args.timeout)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if not line:
            print(p.stdout[-2000:], p.stderr[-4000:])
            raise SystemExit("1-GPU run failed")
        one = json.loads(line[7:])
    print(f"1 GPU ({time.time() - t:.0f} s): {one['tok_s']:.0f} tok/s, step {one['step_s']:.3f} s, losses {one['losses']}",
          flush=True)

    t = time.time()
    ranks = rank_lines(["--name", f"gpu-ddp{n}", "--dir", str(work)] + steps, n, args.timeout)
    r0 = ranks[0]
    tokens = sum(r["tokens"] for r in ranks.values())
    many = {"tok_s": tokens / r0["seconds"], "step_s": r0["step_s"], "tokens": tokens, "seconds": r0["seconds"],
            "losses": r0["losses"], "peak_alloc_gib": max(r["peak_alloc_gib"] for r in ranks.values()),
            "plan": r0["plan"], "per_rank_tokens": [ranks[i]["tokens"] for i in sorted(ranks)],
            "step_times": r0["step_times"],
            "profiles": {rank: r["profile"] for rank, r in ranks.items() if "profile" in r}}
    print(f"{n} GPUs ({time.time() - t:.0f} s): {many['tok_s']:.0f} tok/s, step {many['step_s']:.3f} s, "
          f"losses {many['losses']}", flush=True)
    cmp = compare(one, many, n)
    speedup = many["tok_s"] / one["tok_s"]
    result = {"setup": setup, "one": one, "many": many, "compare": cmp, "speedup": speedup, "gpus": n}
    print("COMPARE " + json.dumps(cmp), flush=True)
    name = f"multi_gpu_{n}gpu_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    single.save_result(result, name, args.results, args.out)  # now, so a run cut during the launcher check keeps its measurements

    if args.check_launcher:
        t = time.time()
        from personatune.config import FinetuneConfig
        from personatune.train import run_training

        cfg = FinetuneConfig(profile="gpu", max_steps=3, seed=42, num_gpus=n, output_dir=str(work / "out"))
        out = work / "launcher" / "adapter"
        try:  # what the flow's training task calls
            run_training(cfg, str(work / "llama2-7b-shaped"), work / "init" / "adapter", work / "tokenized", out,
                         log=lambda l: print(l, flush=True) if ("step " in l or "rror" in l) else None)
            hist = json.loads((out / "history.json").read_text())
            result["launcher"] = {"ok": True, "global_step": hist["global_step"], "files": sorted(os.listdir(out)),
                                  "s": time.time() - t}
        except Exception as e:  # noqa: BLE001 - report it with the measurements
            result["launcher"] = {"ok": False, "error": str(e)[-1500:]}
        print("LAUNCHER " + json.dumps(result["launcher"]), flush=True)

    card = torch.cuda.get_device_name(0)
    rows = [f"| GPUs | layout per GPU | examples / optimizer step | real tokens/s | x 1 GPU | s / step | peak alloc GiB (max over GPUs) | loss step 1 -> {len(many['losses'])} |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for k, r in ((1, one), (n, many)):
        p_ = r["plan"]
        rows.append(f"| {k} | {p_['micro_batch_size']}x{p_['grad_accum']}, packed, {p_['attention']}, ckpt {p_['checkpoint_layers']}/{p_['total_layers']} | "
                    f"{k * p_['micro_batch_size'] * p_['grad_accum']} | {r['tok_s']:,.0f} | {r['tok_s'] / one['tok_s']:.2f} | "
                    f"{r['step_s']:.3f} | {r['peak_alloc_gib']:.2f} | {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")
    ex = "; ".join(f"{k * n * 16} examples: {x:.3f} vs {y:.3f} ({100 * d:.1f}%)" for k, x, y, d in cmp["same_examples"][-3:])
    header = (f"### Multi-GPU: {n} x {card}, {dt.date.today().isoformat()} (`bench/multi_gpu.py`)\n\n"
              f"Llama-2-7B-shaped model, random weights, QLoRA NF4, LoRA r=8 q_proj,v_proj, GPU profile on each card; "
              f"{args.warmup} warm-up + {args.steps} timed optimizer steps; torch {setup['torch']}, "
              f"{', '.join(f'{k} {v}' for k, v in setup['versions'].items())}. {n} GPUs: one DDP rank per GPU "
              f"(personatune.distributed), per-GPU micro-batch as on one GPU, so a step takes {n}x the examples.\n")
    notes = (f"\nSpeed-up {speedup:.2f}x. Loss per optimizer step, {n} GPUs vs 1 GPU (same step index, same LR): "
             f"max relative difference {100 * cmp['max_rel_diff_same_step']:.1f}% over {cmp['steps_compared']} steps, "
             f"{100 * cmp['final_rel_diff_same_step']:.1f}% at the last, {100 * cmp['mean_last_k_rel_diff_same_step']:.1f}% "
             f"between the means of the last {cmp['last_k']} steps. At the same number of examples seen: {ex}.\n")
    text = header + "\n" + "\n".join(rows) + "\n" + notes
    if one.get("profile") and many["profiles"]:
        text += "\n" + profile_table(one["profile"], many["profiles"], n)
    print("\n" + text)
    result.update(card=card, date=dt.date.today().isoformat(), table=text)
    for path in single.save_result(result, name, args.results, args.out):
        print(f"raw results: {path}", flush=True)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write("\n" + text)


def profile_table(one: dict, ranks: dict, n: int) -> str:
    """1 GPU vs each rank of the N-GPU run, per profiled optimizer step (torch.profiler, bench.step_profile)."""
    rows = ["| run | tokens / step | wall ms / step | GPU compute ms / step | NCCL kernels ms / step (incl. waiting) | "
            "wall - compute - NCCL | top GPU kernels (ms / step) |", "|---|---|---:|---:|---:|---:|---|"]
    for name, p in [("1 GPU", one)] + [(f"{n} GPUs, rank {k}", ranks[k]) for k in sorted(ranks, key=int)]:
        tops = "; ".join(f"{o['op'][:32]} {o['ms_per_step']:.1f}" for o in p["top_gpu"][:3])
        rows.append(f"| {name} | {', '.join(map(str, p.get('tokens_per_step', [])))} | {p['wall_ms_per_step']:.1f} | "
                    f"{p['compute_ms_per_step']:.1f} | {p['nccl_ms_per_step']:.1f} | "
                    f"{p['wall_ms_per_step'] - p['gpu_kernel_ms_per_step']:.1f} | {tops} |")
    return (f"Profile of {one['steps']} optimizer steps after the timed ones (torch.profiler, which slows them):\n\n"
            + "\n".join(rows) + "\n")


# variant -> ("1" or "N" GPUs, bench/ddp_variants.py settings and/or a logging interval other than the plan's)
SWEEP = {
    "1gpu": ("1", {}),
    "ddp": ("N", {}),                          # the recipe: the plan's logging interval on every rank
    "ddp-log1": ("N", {"logging_steps": 1}),   # what the ranks did before issue 18: log (and gather) every step
    "static-view": ("N", {"static_graph": True, "gradient_as_bucket_view": True}),
    "static-view-balance": ("N", {"static_graph": True, "gradient_as_bucket_view": True, "balance_tokens": True}),
    "balance": ("N", {"balance_tokens": True}),
    "1gpu-log1": ("1", {"logging_steps": 1}),
    "1gpu-nonblocking": ("1", {"non_blocking": True}),
    "ddp-nonblocking": ("N", {"non_blocking": True}),
}


def window_compare(one: dict, other: dict) -> dict:
    """`other`'s logged losses (each the mean over the steps since the previous log) vs the 1-GPU per-step losses
    averaged over the same steps (same optimizer step index)."""
    a, prev, rows = one["losses"], 0, []
    for step, loss in zip(other["loss_steps"], other["losses"]):
        ref = sum(a[prev:step]) / (step - prev)
        rows.append((step, ref, loss, abs(loss - ref) / ref))
        prev = step
    k = [r for r in rows if r[0] > rows[-1][0] - 10] if rows else []
    return {"windows": rows, "max_rel": max(r[3] for r in rows),
            "last10_rel": abs(sum(r[2] * 1 for r in k) / len(k) - sum(r[1] for r in k) / len(k)) / (sum(r[1] for r in k) / len(k))}


def sweep(args) -> None:
    import torch

    n, work, env, bench_py, setup, t = _prepare(args)
    print(f"setup {time.time() - t:.0f} s: card {setup['card']}, torch {setup['torch']}, {setup['versions']}", flush=True)
    steps = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    results: dict = {"setup": setup, "card": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(),
                     "gpus": n, "steps": args.steps, "warmup": args.warmup, "variants": {}}
    for name in args.variants.split(","):
        kind, over = SWEEP[name]
        t = time.time()
        try:
            if kind == "1":
                import ddp_variants  # bench/ddp_variants.py

                e = {**env, "CUDA_VISIBLE_DEVICES": "0",
                     "PERSONATUNE_BENCH_SETTINGS": json.dumps(over)}
                if over.get("logging_steps"):
                    e["PERSONATUNE_BENCH_LOGGING_STEPS"] = str(over["logging_steps"])
                p = subprocess.run(bench_py + ["_variant", "gpu", "--dir", str(work)] + steps, text=True,
                                   capture_output=True, env=e, timeout=args.timeout)
                line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
                if not line:
                    raise RuntimeError((p.stdout[-1500:] + p.stderr[-3000:]))
                r = json.loads(line[7:])
                r["per_rank_tokens"] = [r["tokens"]]
            else:
                ranks = rank_lines(["--name", f"gpu-{name}", "--ddp", json.dumps(over), "--dir", str(work)] + steps,
                                   n, args.timeout)
                r = dict(ranks[0])
                r["per_rank_tokens"] = [ranks[i]["tokens"] for i in sorted(ranks)]
                r["tokens"] = sum(r["per_rank_tokens"])
                r["tok_s"] = r["tokens"] / r["seconds"]
                r["peak_alloc_gib"] = max(x["peak_alloc_gib"] for x in ranks.values())
                r["rank_batch_tokens"] = [ranks[i]["batch_tokens"] for i in sorted(ranks)]
                r["rank_seconds"] = [ranks[i]["seconds"] for i in sorted(ranks)]
        except Exception as ex:  # noqa: BLE001 - keep the other variants
            print(f"VARIANT {name} failed after {time.time() - t:.0f} s: {str(ex)[-2500:]}", flush=True)
            results["variants"][name] = {"error": str(ex)[-2500:]}
            continue
        r["settings"], r["gpus"], r["wall_s"] = over, (1 if kind == "1" else n), time.time() - t
        results["variants"][name] = r
        base = results["variants"].get("1gpu")
        ratio = r["tok_s"] / base["tok_s"] if base and "tok_s" in base else float("nan")
        cmp = window_compare(base, r) if base and "losses" in base and name != "1gpu" else None
        r["ratio"], r["loss_compare"] = ratio, cmp
        st = sorted(r["step_times"][args.warmup:])
        print(f"VARIANT {name}: {r['gpus']} GPU(s) {r['tok_s']:,.0f} tok/s, {r['step_s']:.4f} s/step (median "
              f"{st[len(st) // 2]:.4f}), x{ratio:.3f} vs 1gpu, tokens/rank {r['per_rank_tokens']}, wall {r['wall_s']:.0f} s"
              + (f", loss windows {[(w[0], round(w[1], 3), round(w[2], 3), round(100 * w[3], 1)) for w in cmp['windows']][-4:]}"
                 f" max {100 * cmp['max_rel']:.1f}% last10 {100 * cmp['last10_rel']:.1f}%" if cmp else ""), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "sweep.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--examples", type=int, default=1200)
    p.add_argument("--dir", default="/tmp/personatune-bench")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="also write the raw JSON here (default $OUT)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the raw JSON goes")
    p.add_argument("--write", default="")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--check-launcher", action="store_true")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many more steps after the timed ones, on 1 GPU and on every rank")
    p.add_argument("--one-via-torchrun", action="store_true",
                   help="run the 1-GPU measurement as one torchrun rank (the N-GPU path's launcher) instead of in-process")
    p = sub.add_parser("sweep", help="1 GPU, then N GPUs once per variant (bench/ddp_variants.py)")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--examples", type=int, default=1200)
    p.add_argument("--dir", default="/tmp/personatune-bench")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--variants", default=",".join(SWEEP), help=f"comma-separated, of {', '.join(SWEEP)}")
    p = sub.add_parser("_rank")
    p.add_argument("--ddp", default="")
    p.add_argument("--name", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    {"run": run, "sweep": sweep, "_rank": rank_main}[args.cmd](args)


if __name__ == "__main__":
    main()
