#!/usr/bin/env python3
"""Where does a GPU-profile training step spend its time? One call on the GPU machine, after `bench.py prepare`:

    python3 bench/step_profile.py run [--variants loop,compile,...]

Loads the Llama-2-7B-shaped QLoRA model exactly as the flow does (`load_qlora_model` + `apply_plan` of the
`gpu` profile), builds the same packed 16-example batches as bench/bench.py, and times a plain training loop
(autocast bf16, forward, backward, grad clip, paged 8-bit AdamW) without the HF Trainer around it, one variant
per process:

    loop           the GPU default's model as the flow builds it (reference)
    loop-sync      the same with loss.item() every step (what a Trainer logging every step does)
    compile        each decoder layer through torch.compile (regional compilation)
    dequant        frozen 4-bit linears swapped for bf16 copies of their dequantized weights (same values)
    compile-dequant   both
    bf16stream     residual stream in bf16 (norms, embedding output) instead of fp32

The first variant also runs torch.profiler over 3 steps and prints where host and GPU time go. Each prints the
step time, peak memory and the loss of every step (same batches, so the losses show whether a variant computes
the same thing).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
GIB = 1024**3
VARIANTS = ["loop", "compile", "dequant", "compile-dequant", "loop-sync", "bf16stream"]


def batches(work: Path, n: int, per_step: int = 16):
    from datasets import load_from_disk

    from personatune.train import collator

    data = load_from_disk(str(work / "tokenized" / "dataset"))["train"]
    collate = collator(None, packing=True, varlen=True)
    rows = [data[i] for i in range(n * per_step)]
    out = [collate([{k: r[k] for k in ("input_ids", "labels")} for r in rows[s * per_step:(s + 1) * per_step]])
           for s in range(n)]
    return out, [len(x) for x in data["input_ids"]]


def variant(args) -> None:
    import torch

    from personatune.config import FinetuneConfig
    from personatune.model import dequantize_frozen_base, load_qlora_model
    from personatune.plan import ModelShape, apply_plan_to_config, plan_training
    from personatune.speedups import apply_plan

    name = args.name
    work = Path(args.dir)
    model_dir = str(work / "llama2-7b-shaped")
    steps = args.warmup + args.steps
    data, lengths = batches(work, steps + (3 if name == "loop" else 0))
    cfg = FinetuneConfig(profile="gpu", seed=42)
    plan = plan_training(cfg, ModelShape.from_pretrained(model_dir), lengths, min_compile_steps=0)
    cfg = apply_plan_to_config(cfg, plan)
    model = load_qlora_model(model_dir, cfg, adapter_dir=str(work / "init" / "adapter"), trainable=True)
    apply_plan(model, plan, torch.bfloat16)
    inner = model.get_base_model()
    info = {"name": name, "plan": plan.describe()}
    if "dequant" in name:
        info["dequantized_layers"] = dequantize_frozen_base(model)
        torch.cuda.empty_cache()
    if name == "bf16stream":
        for p in inner.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
        inner.get_input_embeddings()._forward_hooks.clear()
    if "compile" in name:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 64
        for layer in inner.model.layers:
            layer.compile()
    info["load_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    import bitsandbytes as bnb

    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    losses, times, marks = [], [], []

    def step(batch, sync):
        batch = {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if sync:
            loss.item()

    sync = name == "loop-sync"
    warmup_s = []
    for i, b in enumerate(data[:steps]):
        t = time.perf_counter()
        step(b, sync)
        marks.append(time.perf_counter() - t)       # host time to issue the step (no sync)
        if i < args.warmup or i == steps - 1:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        if i < args.warmup:
            warmup_s.append(round(times[-1] - t, 3))
    tokens = sum(int(b["input_ids"].numel()) for b in data[args.warmup:steps])   # packed: every token is real
    seconds = times[-1] - times[args.warmup - 1]
    info.update({"step_s": seconds / args.steps, "tok_s": tokens / seconds, "tokens_per_step": tokens / args.steps,
                 "warmup_step_s": warmup_s,
                 "host_issue_s": round(sum(marks[args.warmup:]) / args.steps, 4),
                 "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
                 "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                 "losses": [round(float(l), 4) for l in losses]})
    if "compile" in name:
        from torch._dynamo.utils import counters

        info["graph_breaks"] = {str(k): v for k, v in list(counters["graph_break"].items())[:8]}
        info["recompiles"] = int(counters["stats"].get("unique_graphs", 0))
    print("RESULT " + json.dumps(info), flush=True)
    if name == "loop":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for b in data[steps:steps + 3]:
                step(b, False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        from torch.autograd import DeviceType

        avg = prof.key_averages()
        # device-side events only (kernels, memcpy): aten ops also carry the device time of their kernels
        on_device = [e for e in avg if e.device_type == DeviceType.CUDA]
        dev = sum(e.self_device_time_total for e in on_device) / 1e6
        kernels = sum(e.count for e in on_device)
        print(f"PROFILE 3 steps: wall {wall:.3f} s, GPU kernel time {dev:.3f} s ({100 * dev / wall:.0f}% busy), "
              f"~{kernels / 3:.0f} device ops a step", flush=True)
        print(avg.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        print(avg.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))


def run(args) -> None:
    import bench

    work = Path(args.dir)
    env = bench.bench_env()
    start = time.time()
    if not (work / "init" / "adapter").exists():
        setup = bench.run_setup(work, 800, env)
        print(f"setup {time.time() - start:.0f} s: {json.dumps(setup)}", flush=True)
    results = []
    for name in args.variants.split(","):
        left = args.deadline - (time.time() - start)
        if left < 45:
            print(f"{name}: skipped (deadline)", flush=True)
            continue
        t = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "_variant", name, "--dir", str(work), "--steps", str(args.steps),
                                "--warmup", str(args.warmup)], env=env, text=True, capture_output=True,
                               timeout=min(args.variant_timeout, left))
            out, err = p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            out, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"name": name, "error": (err or "")[-1500:]}
        res["wall_s"] = round(time.time() - t, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
        if not line:
            print(err[-3000:], flush=True)
        extra = out.split("RESULT ", 1)[-1].split("\n", 1)[-1] if line else ""
        if extra.strip():
            print(extra, flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "step_profile.json").write_text(json.dumps(results, indent=2))
    print("\n| variant | s/step | tokens/s | host issue s/step | peak alloc GiB | loss last |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "step_s" in r:
            print(f"| {r['name']} | {r['step_s']:.3f} | {r['tok_s']:,.0f} | {r['host_issue_s']:.3f} | "
                  f"{r['peak_alloc_gib']:.2f} | {r['losses'][-1]} |")
        else:
            print(f"| {r['name']} | failed | | | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--dir", default="/tmp/personatune-bench")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--deadline", type=int, default=520)
    p.add_argument("--variant-timeout", type=int, default=200)
    p = sub.add_parser("_variant")
    p.add_argument("name", choices=VARIANTS)
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    {"run": run, "_variant": variant}[args.cmd](args)


if __name__ == "__main__":
    main()
