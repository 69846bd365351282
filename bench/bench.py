#!/usr/bin/env python3
"""QLoRA training throughput: the seed recipe and the project's GPU default, in the same run, on the same data.

Two steps, because the GPU machine has neither the embedded model nor pandera's validation stack:

    python bench/bench.py prepare                 # here (project venv): tokenizes data/quotes.csv with the
                                                  # project's code, copies the tokenizer -> bench/.assets/
    python3 bench/bench.py run --write BENCHMARKS.md   # on the GPU (device tool; carry .whl and bench/.assets)

`run` builds a Llama-2-7B-shaped model with random weights (hidden 4096, 32 layers, 32 heads, intermediate 11008)
whose vocabulary is the size of the tokenizer that produced the data (SmolLM2's, 49,152), saves it once, then
trains each variant in its own process through `personatune.train.train_adapter` - the same function the flow
calls - on `data/quotes.csv` repeated to enough examples, and prints one table: real (non-pad) tokens/s, peak
GPU memory, MFU against the bf16 matrix rate measured in the same run, time for 3 epochs of the CSV and the
loss after the same number of steps (all variants see the same examples in the same order). `--write`
appends the table with the card's name and the date to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "bench" / ".assets"
sys.path.insert(0, str(ROOT))
GIB = 1024**3
SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
SEED_RECIPE = dict(profile="manual", compute_dtype="fp16", packing=False, micro_batch_size=4, grad_accum=4,
                   gradient_checkpointing=True)

# name -> (config overrides, plan overrides, sized-for GiB (None: the real card), description)
VARIANTS = {
    "seed": (SEED_RECIPE, None, None, "seed recipe: fp16, padded 4 x 4, checkpointing, SDPA"),
    "gpu": ({"profile": "gpu"}, None, None, "GPU default, sized for this card"),
    "gpu@24GiB": ({"profile": "gpu"}, None, 24, "GPU default, sized for and capped at 24 GiB"),
    "low-memory": ({"profile": "low-memory"}, None, None, "low-memory profile"),
    # levers, one at a time against the GPU default
    "packing-only": ({"profile": "manual", "compute_dtype": "bf16", "packing": True, "micro_batch_size": 16,
                      "grad_accum": 1, "gradient_checkpointing": False}, None, None,
                     "bf16 + plain packing 16 x 1, SDPA, full fp32 head, no checkpointing"),
    "gpu-sdpa": ({"profile": "gpu"}, {"attention": "sdpa"}, None, "GPU default but stock SDPA on the packed row"),
    "gpu-fullhead": ({"profile": "gpu"}, {"lean_head": False}, None, "GPU default but fp32 head, unchunked loss"),
    "gpu-ckpt-all": ({"profile": "gpu"}, {"checkpoint_layers": 32}, None, "GPU default with every layer checkpointed"),
    "gpu-8x2": ({"profile": "gpu"}, {"micro_batch_size": 8, "grad_accum": 2}, None, "GPU default split 8 x 2"),
    "lowmem-8x2": ({"profile": "low-memory"}, {"micro_batch_size": 8, "grad_accum": 2}, None, "low-memory split 8 x 2"),
    "lowmem-16x1": ({"profile": "low-memory"}, {"micro_batch_size": 16, "grad_accum": 1}, None, "low-memory, whole step"),
    "gpu-32x1": ({"profile": "gpu", "grad_accum": 8}, {"micro_batch_size": 32, "grad_accum": 1}, None,
                 "32 examples a step (a different recipe: shows how speed scales with step size)"),
    "gpu-4bit": ({"profile": "gpu"}, {"dequantized_base": False}, None,
                 "GPU default with the frozen weights kept in 4 bits (what a card without room for them gets)"),
    "gpu-eager": ({"profile": "gpu"}, {"dequantized_base": False, "compile": False}, None,
                  "GPU default without compiled layers or dequantized weights (run 2's default)"),
    "gpu-log1": ({"profile": "gpu", "_logging_steps": 1}, None, None,
                 "GPU default but the Trainer logging every step (a host-GPU sync a step; the default logs every 10)"),
}
DEFAULT_SET = ["seed", "gpu", "gpu@24GiB", "low-memory"]


# ------------------------------------------------------------------------------------------------ prepare (CPU)
def prepare(args) -> None:
    import tempfile

    from personatune.config import EMBEDDED_MODEL, FinetuneConfig
    from personatune.data import build_dataset
    from personatune.files import sha256_file
    from personatune.model import resolve_base_model
    from personatune.tokenization import load_tokenizer, tokenize_dataset

    cfg = FinetuneConfig()
    resolved = resolve_base_model(EMBEDDED_MODEL)
    shutil.rmtree(ASSETS, ignore_errors=True)
    (ASSETS / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (Path(resolved) / name).is_file():
            shutil.copy(Path(resolved) / name, ASSETS / "tokenizer" / name)
    tok = load_tokenizer(resolved)
    with tempfile.TemporaryDirectory() as tmp:
        ds = build_dataset(args.csv, cfg.eval_fraction, Path(tmp) / "dataset")
        tokenize_dataset(ds, tok, cfg.max_seq_len, cfg.on_long_row, ASSETS / "tokenized", quotes_csv=args.csv)
    stats = json.loads((ASSETS / "tokenized" / "stats.json").read_text())
    meta = {"csv": args.csv, "csv_sha256": sha256_file(args.csv), "tokenizer": "SmolLM2-135M-Instruct (embedded)",
            "vocab_size": len(tok), "config_vocab_size": json.loads((Path(resolved) / "config.json").read_text())["vocab_size"],
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "stats": stats}
    (ASSETS / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


# ------------------------------------------------------------------------------------------------ setup (GPU)
def matmul_tflops() -> float:
    import torch

    n, reps = 8192, 30
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def check_varlen(vocab: int) -> dict:
    """Small random Llama (GQA) + LoRA on the GPU, bf16 autocast: padded SDPA vs the GPU profile's packed path
    (varlen flash attention + lean head + chunked loss): loss and LoRA gradients."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from personatune.plan import TrainPlan
    from personatune.speedups import apply_plan
    from personatune.tokenization import IGNORE_INDEX
    from personatune.train import collator

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(conf).cuda()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    feats = []
    for length in (37, 120, 64, 9, 140, 80):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length // 3) + ids[length // 3:]
        feats.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})

    class Tok:
        pad_token_id = 0

    def run(batch):
        model.zero_grad()
        batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for n, p in model.named_parameters() if p.grad is not None])
        return loss.item(), grads

    maxlen = max(len(f["input_ids"]) for f in feats)
    pb = {"input_ids": torch.tensor([f["input_ids"] + [0] * (maxlen - len(f["input_ids"])) for f in feats]),
          "attention_mask": torch.tensor([f["attention_mask"] + [0] * (maxlen - len(f["input_ids"])) for f in feats]),
          "labels": torch.tensor([f["labels"] + [IGNORE_INDEX] * (maxlen - len(f["labels"])) for f in feats])}
    loss_ref, g_ref = run(pb)
    flat = [{k: v for k, v in f.items() if k != "attention_mask"} for f in feats]
    loss_sdpa_packed, g_sp = run(collator(Tok, packing=True)(flat))
    plan = TrainPlan("gpu", 6, 1, True, 0, 4, "varlen", True, None, None, "check")
    apply_plan(model, plan, torch.bfloat16)
    loss_varlen, g_v = run(collator(Tok, packing=True, varlen=True)(flat))
    rel = lambda a, b: float((a - b).norm() / b.norm())
    return {"loss_padded_sdpa": loss_ref, "loss_packed_sdpa": loss_sdpa_packed, "loss_packed_varlen_leanhead": loss_varlen,
            "loss_rel_diff": abs(loss_varlen - loss_ref) / loss_ref,
            "grad_rel_diff_varlen_vs_padded": rel(g_v, g_ref), "grad_rel_diff_packed_sdpa_vs_padded": rel(g_sp, g_ref)}


def setup(args) -> None:
    import torch
    from datasets import concatenate_datasets, load_from_disk

    from personatune.config import FinetuneConfig
    from personatune.model import build_model

    work = Path(args.dir)
    meta = json.loads((ASSETS / "meta.json").read_text())
    vocab = meta["config_vocab_size"]
    out = {"card": torch.cuda.get_device_name(), "card_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB,
           "torch": torch.__version__, "vocab": vocab}
    import transformers, peft, bitsandbytes
    out["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
    out["bf16_matmul_tflops"] = matmul_tflops()
    t = time.time()
    try:
        out["varlen_check"] = check_varlen(vocab)
    except Exception as e:  # keep going: the variants show whether the packed path runs at all
        import traceback
        traceback.print_exc()
        out["varlen_check"] = {"error": repr(e)[:300]}
    out["varlen_check_s"] = time.time() - t
    torch.cuda.empty_cache()
    model_dir = work / "llama2-7b-shaped"
    out.update(build_shaped_model(model_dir))
    data = load_from_disk(str(ASSETS / "tokenized" / "dataset"))
    reps = max(1, -(-args.examples // len(data["train"])))
    data["train"] = concatenate_datasets([data["train"]] * reps)
    data.save_to_disk(str(work / "tokenized" / "dataset"))
    out["train_rows_repeated"] = len(data["train"])
    t = time.time()
    build_model(str(model_dir), FinetuneConfig(), work / "init")
    out["init_adapter_s"] = time.time() - t
    (work / "setup.json").write_text(json.dumps(out, indent=2))
    print("SETUP " + json.dumps(out))


def gpu_bench_setup(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path, dict]:
    """The GPU benches' common part: --dir (work folder), --results and --out parsed with `ap`'s own options, the
    hub kept offline, and the 7B-shaped model built once in <dir>/llama2-7b-shaped. Returns (args, model folder,
    what building it took: {} when it was there)."""
    ap.add_argument("--dir", default="/tmp/personatune-flow-gpu")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.dir) / "llama2-7b-shaped"
    return args, model_dir, build_shaped_model(model_dir)


def cuda_timed(fn):
    """(fn(), seconds) with the card synchronized before and after."""
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, round(time.perf_counter() - t, 3)


def save_result(result: dict, name: str, *folders: str) -> list[Path]:
    """A bench's raw JSON as `name` into each folder given (bench/results, $OUT); a run writes it again as it adds
    to it, so a run cut short keeps what it measured."""
    paths = []
    for folder in filter(None, folders):
        Path(folder).mkdir(parents=True, exist_ok=True)
        paths.append(Path(folder) / name)
        paths[-1].write_text(json.dumps(result, indent=2))
    return paths


def build_shaped_model(model_dir: Path) -> dict:
    """The Llama-2-7B-shaped model with random weights (bf16 safetensors) and the tokenizer that produced the bench
    data (bench/.assets, from `prepare`), saved once into `model_dir`. Also used by bench/flow_gpu.py."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (model_dir / "config.json").is_file():
        return {}
    meta = json.loads((ASSETS / "meta.json").read_text())
    t = time.time()
    conf = LlamaConfig(vocab_size=meta["config_vocab_size"], bos_token_id=meta["bos_token_id"],
                       eos_token_id=meta["eos_token_id"], tie_word_embeddings=False, **SHAPE_7B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()
    for f in (ASSETS / "tokenizer").iterdir():
        shutil.copy(f, model_dir / f.name)
    return {"params": params, "build_s": time.time() - t}


def bench_env() -> dict:
    """Environment of the bench's child processes (setup, variants, ranks)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_setup(work: Path, examples: int, env: dict) -> dict:
    """`_setup` in its own process (bench data, the 7B-shaped model, the initial adapter); returns its SETUP line.
    Shared by bench.py, multi_gpu.py and step_profile.py."""
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_setup", "--dir", str(work), "--examples",
                        str(examples)], env=env, text=True, capture_output=True)
    if p.returncode:
        print(p.stdout[-3000:], p.stderr[-6000:])
        raise SystemExit("setup failed")
    return json.loads(next(l for l in p.stdout.splitlines() if l.startswith("SETUP "))[6:])


# ------------------------------------------------------------------------------------------------ one variant (GPU)
def variant(args, train=None, plan_over: dict | None = None, arguments: dict | None = None,
            trainer_class=None) -> None:
    """One variant, timed, in this process: the plan made once (as the flow makes it), the variant's overrides
    applied to it, then `train` (default `personatune.train.train_adapter`; a DDP rank passes
    `personatune.train_rank.train_on_rank`, same signature) with a token-counting collator and a timer."""
    cfg_over, variant_plan, card_gib, _ = VARIANTS[getattr(args, "variant", None) or args.name]
    cfg_over = dict(cfg_over)
    logging_steps = int(cfg_over.pop("_logging_steps", 0) or os.environ.get("PERSONATUNE_BENCH_LOGGING_STEPS", 0))
    if card_gib:  # sized for, and capped at, a card of this size (enforced where the model is loaded)
        os.environ["PERSONATUNE_GPU_MEMORY_GIB"] = str(card_gib)
    import torch
    from transformers import TrainerCallback

    from personatune.config import FinetuneConfig
    from personatune.tokenization import load_tokenizer
    from personatune.train import collator, plan_for_run, train_adapter

    train = train or train_adapter
    # a one-GPU sweep variant's settings (bench/ddp_variants.py), given by multi_gpu.py sweep
    settings = json.loads(os.environ.get("PERSONATUNE_BENCH_SETTINGS", "{}"))
    if settings:
        import ddp_variants  # bench/ddp_variants.py

        arguments = arguments or ddp_variants.arguments(settings) or None
        trainer_class = trainer_class or ddp_variants.trainer_class(settings)
    work = Path(args.dir)
    steps = args.warmup + args.steps
    # PERSONATUNE_BENCH_PROFILE_STEPS=k: k more steps after the timed ones, under torch.profiler (step_profile)
    profile_steps = int(os.environ.get("PERSONATUNE_BENCH_PROFILE_STEPS", 0) or 0)
    model_dir = str(work / "llama2-7b-shaped")
    cfg = FinetuneConfig(**{**cfg_over, "max_steps": steps + profile_steps, "seed": 42, "output_dir": str(work / "out")})
    plan = plan_for_run(cfg, model_dir, work / "tokenized", min_compile_steps=0)  # the steady-state step
    over = {**(variant_plan or {}), **(plan_over or {}), **({"logging_steps": logging_steps} if logging_steps else {})}
    if over:
        plan = dataclasses.replace(plan, **over, reason=plan.reason + "; bench override " + json.dumps(over))
    counts: list[int] = []
    inner = collator(load_tokenizer(model_dir), plan.packing, varlen=plan.attention == "varlen")

    def counting_collator(features):
        batch = inner(features)
        counts.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
        return batch

    times: list[float] = []
    peaks = {}
    profiled: dict = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            torch.cuda.synchronize()
            peaks["load_alloc"] = torch.cuda.max_memory_allocated() / GIB
            peaks["load_reserved"] = torch.cuda.max_memory_reserved() / GIB
            times.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            # sync only where the timing window starts and ends: a sync every step would hide what the
            # training loop's own host syncs (e.g. logging every step) cost
            if state.global_step in (args.warmup, args.warmup + args.steps):
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            if profile_steps and state.global_step == steps:  # after the timed window: profiling slows steps
                profiled["profiler"] = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                profiled["profiler"].__enter__()
                profiled["start"] = time.perf_counter()
            elif profile_steps and state.global_step == steps + profile_steps and "profiler" in profiled:
                torch.cuda.synchronize()
                wall = time.perf_counter() - profiled["start"]
                profiled["profiler"].__exit__(None, None, None)
                profiled.update(step_profile(profiled.pop("profiler"), profile_steps, wall))
                accum = plan.grad_accum
                profiled["tokens_per_step"] = [sum(counts[k * accum:(k + 1) * accum]) for k in range(steps, steps + profile_steps)]

        def on_train_end(self, a, state, control, **kw):
            if "profiler" in profiled:  # training ended inside the profiled window: no profile, nothing left open
                profiled.pop("profiler").__exit__(None, None, None)
                profiled["error"] = f"training ended at step {state.global_step}, inside the profiled steps"

    out_dir = work / "runs" / args.name
    shutil.rmtree(out_dir, ignore_errors=True)
    adapter = train(cfg, plan, model_dir, work / "init" / "adapter", work / "tokenized", out_dir / "adapter",
                    out_dir / "ckpt", callbacks=[Timer()], data_collator=counting_collator,
                    trainer_class=trainer_class, **({"arguments": arguments} if arguments else {}))
    hist = json.loads((adapter / "history.json").read_text())
    plan = plan.to_dict()
    accum = plan["grad_accum"]
    t0, t1 = times[args.warmup], times[steps]       # end of warm-up step .. end of last step
    tokens = sum(counts[args.warmup * accum: steps * accum])
    logged = [e for e in hist["loss"] if e["step"] <= steps]  # the profiled steps, if any, are not in the numbers
    losses = [e["loss"] for e in logged]
    res = {"name": args.name, "plan": plan, "tokens": tokens, "seconds": t1 - t0, "tok_s": tokens / (t1 - t0),
           "step_s": (t1 - t0) / args.steps, "tokens_per_step": tokens / args.steps,
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB, **peaks,
           "loss_first": losses[0], "loss_last": losses[-1], "losses": losses, "steps": steps,
           "step_times": [round(b - a, 4) for a, b in zip(times[:steps + 1], times[1:steps + 1])],
           "loss_steps": [e["step"] for e in logged], "batch_tokens": counts[:steps * accum]}
    if profiled:
        # the run trained steps + profile_steps, so its cosine schedule is longer: its losses do not compare with
        # an unprofiled run's (the 1-GPU and N-GPU runs of multi_gpu.py are both profiled, so they compare)
        res["profile"] = {**profiled, "schedule_steps": steps + profile_steps}
    print("RESULT " + json.dumps(res), flush=True)


def step_profile(prof, steps: int, wall_s: float, top: int = 12) -> dict:
    """Where `steps` profiled optimizer steps spent their time, per step: wall, the GPU's kernel time (compute, and
    NCCL collectives apart: they run on their own stream, so they may overlap compute), and the ops with the most
    GPU and host time."""
    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    from torch.autograd import DeviceType

    events = prof.key_averages()
    # the GPU's own events (kernels, memcpy/memset); a host op's device time counts its kernels again, and the
    # annotated ranges mirrored on the GPU timeline (DDP forward, optimizer step, nccl:all_reduce) span kernels
    on_gpu = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
              and not getattr(e, "is_user_annotation", False)]
    nccl = [e for e in on_gpu if "nccl" in e.key.lower()]  # includes the time a rank waits for the other
    kernels = sum(device_us(e) for e in on_gpu) / 1e3 / steps
    collectives = sum(device_us(e) for e in nccl) / 1e3 / steps
    by_gpu = sorted(on_gpu, key=device_us, reverse=True)[:top]
    by_host = sorted([e for e in events if getattr(e, "device_type", None) != DeviceType.CUDA],
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"steps": steps, "wall_ms_per_step": round(1e3 * wall_s / steps, 2),
            "gpu_kernel_ms_per_step": round(kernels, 2), "nccl_ms_per_step": round(collectives, 2),
            "compute_ms_per_step": round(kernels - collectives, 2),
            "top_gpu": [{"op": e.key[:90], "ms_per_step": round(device_us(e) / 1e3 / steps, 3), "calls": e.count // steps}
                        for e in by_gpu],
            "top_host": [{"op": e.key[:90], "ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                          "calls": e.count // steps} for e in by_host]}


# ------------------------------------------------------------------------------------------------ driver (GPU)
def args_warmup(r: dict) -> int:
    return r["steps"] - round(r["seconds"] / r["step_s"])


def describe_run(setup_info: dict, meta: dict, warmup: int, steps: int) -> str:
    """The paragraph printed above the table (bench/tables.py prints it again from the `--out` JSON)."""
    return (f"Llama-2-7B-shaped model, random weights, vocab {setup_info['vocab']} (the SmolLM2 tokenizer that produced the data), "
            f"QLoRA NF4 + double quant, LoRA r=8 on q_proj,v_proj; data/quotes.csv train split tokenized by the project "
            f"({meta['stats']['train']['rows']} rows, {meta['stats']['train']['tokens']} tokens), repeated; "
            f"{warmup} warm-up + {steps} timed optimizer steps of 16 examples, same examples in the same order for every variant. "
            f"bf16 matrix rate measured in the run: {setup_info['bf16_matmul_tflops']:.0f} TFLOP/s. "
            f"torch {setup_info['torch']}, {', '.join(f'{k} {v}' for k, v in setup_info['versions'].items())}.\n")


def fmt_table(setup_info: dict, results: list[dict], meta: dict) -> str:
    train_tokens = meta["stats"]["train"]["tokens"]
    layer_params = SHAPE_7B["num_hidden_layers"] * (4 * SHAPE_7B["hidden_size"] ** 2 + 3 * SHAPE_7B["hidden_size"] * SHAPE_7B["intermediate_size"])
    flops_per_token = 4 * (layer_params + setup_info["vocab"] * SHAPE_7B["hidden_size"])  # frozen base: fwd 2N + input-grad 2N
    seed = next((r for r in results if r["name"] == "seed" and "tok_s" in r), None)
    med = lambda r: r["tokens_per_step"] / sorted(r["step_times"][args_warmup(r):])[len(r["step_times"][args_warmup(r):]) // 2]
    rows = ["| variant | layout | real tokens/s | x seed | tokens/s at median step (x seed) | peak alloc GiB | peak reserved GiB | MFU | first steps (warm-up) | 3 epochs of quotes.csv | loss step 1 -> step N |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "tok_s" not in r:
            rows.append(f"| {r['name']} | {VARIANTS[r['name']][3]} | failed: {r.get('error', '?')[:80]} | | | | | | | | |")
            continue
        p = r["plan"]
        layout = (f"{p['micro_batch_size']}x{p['grad_accum']}, {'packed' if p['packing'] else 'padded'}, {p['attention']}, "
                  f"ckpt {p['checkpoint_layers']}/{p['total_layers']}, head {'lean' if p['lean_head'] else 'fp32'}"
                  + (", compiled" if p.get("compile") else "") + (", bf16 weights" if p.get("dequantized_base") else ""))
        mfu = r["tok_s"] * flops_per_token / (setup_info["bf16_matmul_tflops"] * 1e12)
        ratio = f"{r['tok_s'] / seed['tok_s']:.1f}" if seed else "-"
        epochs3 = 3 * train_tokens / r["tok_s"]
        mratio = f" ({med(r) / med(seed):.1f})" if seed else ""
        warm = sum(r["step_times"][:args_warmup(r)])
        rows.append(f"| {r['name']} | {layout} | {r['tok_s']:,.0f} | {ratio} | {med(r):,.0f}{mratio} | {r['peak_alloc_gib']:.2f} | "
                    f"{r['peak_reserved_gib']:.2f} | {100 * mfu:.1f}% | {warm:.1f} s | {epochs3:.0f} s (+{max(0.0, warm - args_warmup(r) * r['step_s']):.0f} s) | "
                    f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    return "\n".join(rows)


def run(args) -> None:
    import torch

    assert torch.cuda.is_available(), "run needs a CUDA GPU"
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    meta = json.loads((ASSETS / "meta.json").read_text())
    env = bench_env()
    me = [sys.executable, str(Path(__file__).resolve())]
    t = time.time()
    setup_info = run_setup(work, args.examples, env)
    print(f"setup {time.time() - t:.0f} s: {json.dumps(setup_info)}", flush=True)
    results = []
    names = args.variants.split(",") if args.variants else DEFAULT_SET
    start = time.time()
    for name in names:
        if time.time() - start > args.deadline:
            print(f"{name}: skipped, past the {args.deadline} s deadline", flush=True)
            continue
        t = time.time()
        try:
            p = subprocess.run(me + ["_variant", name, "--dir", str(work), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                               env=env, text=True, capture_output=True, timeout=args.variant_timeout)
            line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
            layout = next((l for l in p.stdout.splitlines() if l.startswith("Training layout")), "")
            if line:
                res = json.loads(line[7:])
            else:
                err = [l for l in (p.stderr or "").splitlines() if "Error" in l or "error" in l]
                res = {"name": name, "error": (err[-1] if err else "no result")}
                print((p.stderr or "")[-2500:])
        except subprocess.TimeoutExpired:
            res, layout = {"name": name, "error": f"timeout {args.variant_timeout}s"}, ""
        res["wall_s"] = time.time() - t
        results.append(res)
        short = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if k not in ("losses", "plan")}
        print(f"{name}: {layout}\n  {json.dumps(short)}", flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            # everything bench/tables.py needs to print this run's table again (commit it under bench/results/)
            (Path(args.out) / "bench.json").write_text(json.dumps(
                {"command": " ".join(sys.argv), "date": dt.date.today().isoformat(), "warmup": args.warmup,
                 "steps": args.steps, "meta": meta, "setup": setup_info, "results": results}, indent=2))
    table = fmt_table(setup_info, results, meta)
    date = dt.date.today().isoformat()
    header = (f"### {setup_info['card']} ({setup_info['card_memory_gib']:.0f} GiB), {date}\n\n"
              + describe_run(setup_info, meta, args.warmup, args.steps))
    print("\n" + header + "\n" + table)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write("\n" + header + "\n" + table + "\n")
    if args.out:
        (Path(args.out) / "table.md").write_text(header + "\n" + table + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize the CSV and copy the tokenizer into bench/.assets (CPU, project venv)")
    p.add_argument("--csv", default="data/quotes.csv")
    p = sub.add_parser("run", help="run the variants on the GPU and print the table")
    p.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)} (default {','.join(DEFAULT_SET)})")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--dir", default="/tmp/personatune-bench")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    p.add_argument("--write", default="", help="append the table to this Markdown file (BENCHMARKS.md)")
    p.add_argument("--variant-timeout", type=int, default=240)
    p.add_argument("--deadline", type=int, default=100000, help="start no variant after this many seconds")
    p = sub.add_parser("_setup")
    p.add_argument("--dir", required=True)
    p.add_argument("--examples", type=int, default=600)
    p = sub.add_parser("_variant")
    p.add_argument("name", choices=list(VARIANTS))
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    {"prepare": prepare, "run": run, "_setup": setup, "_variant": variant}[args.cmd](args)


if __name__ == "__main__":
    main()
