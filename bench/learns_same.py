#!/usr/bin/env python3
"""Does the GPU default learn the same thing as the seed recipe? CPU run on the embedded model, real weights.

Trains the embedded SmolLM2-135M-Instruct on data/quotes.csv twice from the same initial adapter, through
`personatune.train.train_adapter`:
  seed: padded batches 4 x 4 (the seed recipe's layout; no checkpointing - it only recomputes, same math)
  gpu:  the GPU profile's layout forced on the CPU: packed 16 x 1, per-example attention (block-diagonal mask
        here; varlen flash on CUDA), lean head with the chunked loss
and compares the held-out loss per response token after the same epochs. fp32 compute for both (the CPU has no
fast half precision). Usage: python bench/learns_same.py [--epochs 1] [--out bench/.assets/learns_same.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / ".assets" / "learns_same.json"))
    args = ap.parse_args()

    import torch

    from personatune.config import EMBEDDED_MODEL, FinetuneConfig
    from personatune.data import build_dataset
    from personatune.evaluate import mean_loss
    from personatune.model import build_model, load_qlora_model, resolve_base_model
    from personatune.tokenization import load_tokenized, load_tokenizer, tokenize_dataset
    from personatune.plan import TrainPlan
    from personatune.train import plan_for_run, train_adapter

    torch.set_num_threads(2)
    resolved = resolve_base_model(EMBEDDED_MODEL)
    tok = load_tokenizer(resolved)
    base = FinetuneConfig(epochs=args.epochs, compute_dtype="fp32", profile="manual")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = build_dataset(ROOT / "data" / "quotes.csv", base.eval_fraction, tmp / "dataset")
        tokenized = tokenize_dataset(ds, tok, base.max_seq_len, base.on_long_row, tmp / "tokens")
        init = build_model(resolved, base, tmp / "init")
        eval_ds = load_tokenized(tokenized)["eval"]
        layouts = {
            "seed": (dict(packing=False, micro_batch_size=4, grad_accum=4), None),
            "gpu": (dict(packing=True, micro_batch_size=16, grad_accum=1),
                    TrainPlan("gpu", 16, 1, True, 0, 30, "varlen", True, None, None, "GPU layout forced on CPU")),
        }
        for name, (over, plan) in layouts.items():
            cfg = base.replace(**over)
            plan = plan or plan_for_run(cfg, resolved, tokenized)
            t = time.time()
            adapter = train_adapter(cfg, plan, resolved, init / "adapter", tokenized, tmp / f"adapter-{name}")
            train_s = time.time() - t
            model = load_qlora_model(resolved, cfg, adapter_dir=str(adapter), trainable=False)
            with torch.no_grad():
                held_out = mean_loss(model, eval_ds, tok)
            hist = json.loads((adapter / "history.json").read_text())
            results[name] = {"held_out_loss": held_out, "train_s": train_s, "steps": hist["global_step"],
                             "last_train_loss": hist["loss"][-1]["loss"], "layout": hist.get("layout")}
            print(name, json.dumps({k: v for k, v in results[name].items() if k != "layout"}), flush=True)
        with torch.no_grad():
            model = load_qlora_model(resolved, base, adapter_dir=str(init / "adapter"), trainable=False)
            results["base_held_out_loss"] = mean_loss(model, eval_ds, tok)
    rel = abs(results["gpu"]["held_out_loss"] - results["seed"]["held_out_loss"]) / results["seed"]["held_out_loss"]
    results["relative_difference"] = rel
    results["epochs"] = args.epochs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"held-out loss: base {results['base_held_out_loss']:.4f}, seed {results['seed']['held_out_loss']:.4f}, "
          f"gpu layout {results['gpu']['held_out_loss']:.4f}, relative difference {100 * rel:.2f}%")


if __name__ == "__main__":
    main()
