#!/usr/bin/env python3
"""Where the evaluation's time goes on a GPU (issue 18 item 5: "evaluation stage <= 10 s").

    # on the GPU machine, after the install of bench/flow_gpu.py's docstring:
    python3 bench/eval_gpu.py [--dir /tmp/personatune-flow-gpu]

On the Llama-2-7B-shaped random-weight model of bench/bench.py (random weights never write EOS, so every reply
runs to the token limit: the slowest case), with the flow's default decoding and evaluation sets, times (CUDA
synchronized): loading the 4-bit base and dequantizing it, putting a LoRA adapter on the loaded base, generating
the replies of each set alone, of both sets in one batch, and of both sets twice in one batch (272 prompts), each
decoding control switched off in turn, the reference losses, a batch size seen for the first time vs again with and
without cuDNN's attention; then a torch profiler summary of a few decoding steps. Prints the numbers and writes the
raw JSON to bench/results/ and $OUT.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    import bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args, model_dir, _ = bench.gpu_bench_setup(ap)
    work = model_dir.parent

    import torch
    from peft import PeftModel, get_peft_model

    from personatune.config import FinetuneConfig
    from personatune.decoding import Decoding
    from personatune.evaluate import eval_sets, fast_inference, generate_replies, reference_loss
    from personatune.model import load_base_model, lora_config
    from personatune.tokenization import load_tokenizer

    cfg = FinetuneConfig(base_model=str(model_dir), keep_quantized_base=False)  # each load quantizes, as measured before the copy
    record: dict = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": dt.date.today().isoformat(),
                    "model": "Llama-2-7B-shaped, random weights", "decoding": Decoding.from_config(cfg).to_dict(),
                    "seconds": {}}
    s = record["seconds"]
    name = f"eval_gpu_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"

    def note(key, value):
        s[key] = value
        print(f"{key}: {value}", flush=True)
        bench.save_result(record, name, args.results, args.out)

    tok, t = bench.cuda_timed(lambda: load_tokenizer(str(model_dir), cfg.base_revision))
    note("tokenizer", t)
    model, t = bench.cuda_timed(lambda: load_base_model(str(model_dir), cfg))
    note("load_4bit", t)
    _, t = bench.cuda_timed(lambda: fast_inference(model))
    note("dequantize", t)
    adapter = work / "eval-gpu-adapter"
    if not (adapter / "adapter_config.json").is_file():
        torch.manual_seed(0)
        fresh = get_peft_model(model, lora_config(cfg, model))
        for n, p in fresh.named_parameters():  # a nonzero B: the adapter changes the replies, like a trained one
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        fresh.save_pretrained(adapter)
        model = fresh.unload()  # the plain base back
    peft, t = bench.cuda_timed(lambda: PeftModel.from_pretrained(model, str(adapter), adapter_name="challenger"))
    note("attach_adapter", t)
    sets = eval_sets(cfg)
    dec = Decoding.from_config(cfg)
    prompts = {k: [(r["instruction"], r["user"]) for r in v] for k, v in sets.items()}
    both = prompts["golden"] + prompts["probes"]

    def gen(rows, decoding=dec, **kw):
        return generate_replies(peft, tok, rows, decoding, **kw)

    _, t = bench.cuda_timed(lambda: gen(prompts["probes"][:8], Decoding(4, dec.repetition_penalty)))
    note("warmup_4_tokens_8_rows", t)
    out, t = bench.cuda_timed(lambda: gen(prompts["golden"]))
    note("generate_golden_72", t)
    note("new_tokens_golden", sum(g["new_tokens"] for g in out))
    _, t = bench.cuda_timed(lambda: gen(prompts["probes"]))
    note("generate_probes_64", t)
    _, t = bench.cuda_timed(lambda: gen(both))
    note("generate_both_136", t)
    with peft.disable_adapter():  # the base alone decodes without the contrast (as the flow scores it)
        _, t = bench.cuda_timed(lambda: gen(both, dec.without_contrast()))
    note("generate_both_136_base", t)
    _, t = bench.cuda_timed(lambda: gen(both, stop_markers=False))
    note("generate_both_136_no_stop_strings", t)
    _, t = bench.cuda_timed(lambda: gen(both, Decoding(dec.max_new_tokens)))
    note("generate_both_136_no_repetition_penalty", t)
    _, t = bench.cuda_timed(lambda: gen(both + both, batch_size=272))
    note("generate_272_one_batch", t)
    for k, rows in sets.items():
        _, t = bench.cuda_timed(lambda: reference_loss(peft, tok, rows))
        note(f"reference_loss_{k}", t)
    # A batch size not seen before costs more than a repeated one (above: 136 rows 14.6 s the first time, 5.5-6.5 s
    # after). Whether that is cuDNN attention building a plan per new shape (the profile shows its kernels): a new
    # batch size twice with cuDNN's SDPA, then another new one twice without it.
    for label, rows, cudnn in (("cudnn", both[:120], True), ("no_cudnn", both[:100], False)):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        for attempt in ("new_shape", "same_shape"):
            _, t = bench.cuda_timed(lambda: gen(rows))
            note(f"generate_{len(rows)}_{label}_{attempt}", t)
    torch.backends.cuda.enable_cudnn_sdp(True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen(both, Decoding(8, dec.repetition_penalty))
    for key in ("cuda_time_total", "self_cpu_time_total"):
        table = prof.key_averages().table(sort_by=key, row_limit=25)
        record[f"profile_8_steps_136_rows_by_{key}"] = table
        print(table, flush=True)
    bench.save_result(record, name, args.results, args.out)


if __name__ == "__main__":
    main()
