"""The training plan: how a run is laid out on the hardware it finds, without changing what is learned. Pure:
numbers in (config, model shape, example lengths, card memory), numbers out (a `TrainPlan`); no model is touched
here, so every choice is testable on a CPU (tests/test_profiles.py). `personatune.speedups.apply_plan` then changes
the loaded model to follow the plan; `personatune.train.train_adapter` takes the plan as a parameter.

A plan never changes the recipe (examples per optimizer step, learning rate, schedule, epochs, LoRA): it only
chooses how the `micro_batch_size x grad_accum` examples of one optimizer step are computed. The optimizer sees
the same examples in the same order either way, and the loss is normalised by the number of response tokens of
the whole step, so the gradients are the same up to rounding.

| profile | where | what it does |
|---|---|---|
| `auto` (default) | CUDA | `gpu` |
| `auto` | CPU | `cpu`: the config's layout, frozen NF4 weights dequantized once, the loss applying the frozen head at the reply's positions only (same loss and gradients, ~9% less time a step) |
| `gpu` | CUDA | bf16, padding-free packing, varlen flash attention, the whole optimizer step in one micro-batch, activation checkpointing on only as many layers as the card's memory needs, frozen lm_head kept in the compute dtype, chunked loss, decoder layers compiled (`compile`), and on a card with memory to spare the frozen NF4 weights cached dequantized in the compute dtype |
| `low-memory` | CUDA, small cards | the same, with every layer checkpointed and the weights kept in 4 bits: fits where the seed recipe fits |
| `manual` | anywhere | exactly the config's `micro_batch_size`, `grad_accum`, `gradient_checkpointing`, `packing`; stock SDPA attention |

When a layout still runs out of memory, `next_layout_after_oom` is the back-off: the same examples per step with
less memory (cached weights dropped, then every layer checkpointed, then half the micro-batch), ending in
`DoesNotFit` after one example per pass. Measured numbers behind the memory model and the choices: BENCHMARKS.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

PROFILES = ("auto", "gpu", "low-memory", "manual")
GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int = 32

    @property
    def layer_params(self) -> int:  # q,k,v,o (no GQA assumed: an upper bound) + gate, up, down
        return self.layers * (4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        get = (lambda k: config[k]) if isinstance(config, dict) else (lambda k: getattr(config, k))
        return cls(hidden=get("hidden_size"), layers=get("num_hidden_layers"),
                   intermediate=get("intermediate_size"), vocab=get("vocab_size"),
                   heads=get("num_attention_heads"))

    @classmethod
    def from_pretrained(cls, resolved: str, revision: str | None = None) -> "ModelShape":
        path = Path(resolved) / "config.json"
        if path.is_file():
            return cls.from_config(json.loads(path.read_text()))
        from transformers import AutoConfig

        return cls.from_config(AutoConfig.from_pretrained(resolved, revision=revision))


@dataclass(frozen=True)
class TrainPlan:
    profile: str                   # resolved profile: gpu, low-memory or manual
    micro_batch_size: int
    grad_accum: int
    packing: bool
    checkpoint_layers: int         # decoder layers whose activations are recomputed in backward
    total_layers: int
    attention: str                 # "varlen" (flash, per-example) or "sdpa" (stock)
    lean_head: bool                # frozen embedding/lm_head kept in the compute dtype (not fp32), loss chunked
                                   # (CPU: the head's own dtype, at the labelled positions only; speedups.use_lean_head)
    estimated_peak_gib: float | None
    budget_gib: float | None
    reason: str
    loss_chunk_tokens: int = 1024  # tokens whose logits exist at once in the chunked loss (0: all, not recomputed)
    compile: bool = False          # torch.compile each decoder layer (regional compilation)
    dequantized_base: bool = False  # frozen NF4 weights cached dequantized (same values, 4x their memory, no
                                    # dequantize kernels in the step)
    logging_steps: int = 1         # Trainer logging interval: each log reads the loss back (a host-GPU sync);
                                   # the per-step loss is still recorded (personatune.train.StepLosses)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.checkpoint_layers > 0

    def describe(self) -> str:
        ckpt = ("off" if not self.checkpoint_layers else
                f"{self.checkpoint_layers}/{self.total_layers} layers")
        mem = "" if self.estimated_peak_gib is None else (
            f", estimated peak {self.estimated_peak_gib:.1f} GiB of a {self.budget_gib:.1f} GiB budget")
        return (f"profile {self.profile}: {self.micro_batch_size} examples x {self.grad_accum} accumulation, "
                f"packing {'on' if self.packing else 'off'}, attention {self.attention}, checkpointing {ckpt}, "
                f"lean head {'on' if self.lean_head else 'off'}, compiled layers {'on' if self.compile else 'off'}, "
                f"frozen weights {'dequantized (NF4 values)' if self.dequantized_base else '4-bit'}{mem} ({self.reason})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- memory model ---------------------------------------------------------------------------------------------
# Bytes of activations kept for backward per token, calibrated on a Llama-2-7B shape (BENCHMARKS.md): a layer
# that is not checkpointed keeps about ACT_PER_HIDDEN x hidden + ACT_PER_INTER x intermediate bytes per token
# (fp32 residual stream from prepare_model_for_kbit_training, bf16 q/k/v/o and MLP inputs, LoRA dropout copies);
# a checkpointed one keeps its fp32 input only (4 x hidden). The loss keeps ~LOSS_BYTES per vocab entry of a
# token chunk; the chunked loss bounds that chunk.
ACT_PER_HIDDEN = 22
ACT_PER_INTER = 11
CKPT_PER_HIDDEN = 4
LOSS_CHUNK_TOKENS = 1024
LOW_MEMORY_LOSS_CHUNK_TOKENS = 256
LOSS_BYTES = 12
FIXED_GIB = 0.6                   # CUDA workspaces, LoRA weights and optimizer state, allocator slack
HEADROOM = 0.92                   # share of the card's memory the plan may use
# Kept free besides: the caching allocator reserves more than is allocated (reserved - allocated at the peak:
# 0.57 GiB low-memory, 0.39 GiB gpu@24GiB, H200, BENCHMARKS.md), and an 8 GiB plan estimated at 7.3 GiB of a
# 7.4 GiB budget ran out of memory (issue 18). The estimate is of allocated memory, so the budget leaves that gap.
ALLOCATOR_MARGIN_GIB = 0.6
# Compiled layers keep fewer activations (fused casts and elementwise ops): peak memory above the weights fell
# from 6.7 to 3.6 GiB on the 7B bench step (H200, BENCHMARKS.md). 0.6 keeps a margin over the measured 0.54.
COMPILED_ACT_SCALE = 0.6
# Caching the dequantized weights is chosen only when the estimate stays this far under the budget: the estimate
# was calibrated on 4-bit runs, and the speed-up is not worth an out-of-memory retry.
DEQUANTIZED_HEADROOM = 0.85
# A Trainer log reads the loss back from the GPU: a sync that drains the queue every logged step. At ~0.1 s a step
# logging every step cost 35% of the throughput (0.133 vs 0.085 s a step, H200, BENCHMARKS.md); every 10 steps is
# a line a second. The loss of every step is still recorded without a sync (history.json).
GPU_LOGGING_STEPS = 10
# torch.compile of the decoder layers costs a fixed ~36 s on the 7B (H200: the flow's train stage took 51.9 s
# compiled vs 15.5 and 17.1 s eager for 58 steps, bench/results/flow_h200/) and saves a few hundredths of a second
# per 16-example step there, so a run shorter than this many optimizer steps trains eagerly.
COMPILE_MIN_STEPS = 1000


def estimate_peak_gib(shape: ModelShape, tokens: int, checkpoint_layers: int, lean_head: bool = True,
                      loss_chunk: int = LOSS_CHUNK_TOKENS, compiled: bool = False, dequantized: bool = False) -> float:
    weights = shape.layer_params * (2.0 if dequantized else 0.5 * 1.04)  # bf16 copies, or NF4 + double-quant scales
    weights += 2 * shape.vocab * shape.hidden * (2 if lean_head else 4)  # embedding + lm_head (fp32 after kbit prep)
    per_layer = (ACT_PER_HIDDEN * shape.hidden + ACT_PER_INTER * shape.intermediate) * (COMPILED_ACT_SCALE if compiled else 1)
    acts = tokens * ((shape.layers - checkpoint_layers) * per_layer + checkpoint_layers * CKPT_PER_HIDDEN * shape.hidden)
    if checkpoint_layers:
        acts += tokens * per_layer                                   # the layer being recomputed
    loss_tokens = min(tokens, loss_chunk) if lean_head else tokens
    loss = loss_tokens * shape.vocab * LOSS_BYTES
    return (weights + acts + loss) / GIB + FIXED_GIB


def card_memory_gib() -> float | None:
    """Memory of the current CUDA card; PERSONATUNE_GPU_MEMORY_GIB overrides it (size for a smaller card; the cap is
    also enforced, `personatune.speedups.enforce_memory_cap`)."""
    override = memory_cap_gib()
    if override:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def memory_cap_gib(environ=None) -> float | None:
    """PERSONATUNE_GPU_MEMORY_GIB as a number (None when unset); a bad value is a clear error."""
    value = (os.environ if environ is None else environ).get("PERSONATUNE_GPU_MEMORY_GIB", "").strip()
    if not value:
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise ValueError(f"PERSONATUNE_GPU_MEMORY_GIB={value!r}: expected a positive number of GiB (e.g. 8)")
    return gib


def memory_fraction(cap_gib: float | None, total_bytes: int) -> float | None:
    """Share of a card of `total_bytes` that a cap of `cap_gib` allows (None: no cap, or a cap above the card)."""
    if not cap_gib or cap_gib * GIB >= total_bytes:
        return None
    return cap_gib * GIB / total_bytes


def budget_gib(card_gib: float) -> float:
    """Memory the plan may fill on a card of `card_gib`: HEADROOM of it, less the allocator's measured margin."""
    return max(0.0, card_gib * HEADROOM - ALLOCATOR_MARGIN_GIB)


def longest_step_tokens(lengths: list[int], examples: int) -> int:
    """Worst case tokens in one packed micro-batch: the `examples` longest examples together."""
    return sum(sorted(lengths, reverse=True)[:examples]) if lengths else 0


def plan_training(cfg, shape: ModelShape | None = None, lengths: list[int] | None = None,
                  memory_gib: float | None = None, cuda: bool | None = None,
                  min_compile_steps: int = COMPILE_MIN_STEPS) -> TrainPlan:
    """Choose micro-batch, accumulation, checkpointing and attention for `cfg.profile` on this card.

    `cfg.compile` compiles the decoder layers only when the run has at least `min_compile_steps` optimizer steps
    (counted from `lengths`, the training examples, and the config's epochs or max_steps): a shorter run would
    spend longer compiling than compiling saves. A benchmark of the steady-state step passes 0."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    profile = getattr(cfg, "profile", "auto")
    layers = shape.layers if shape else 0
    if profile == "auto" and not cuda:
        # The CPU default: the config's layout, with the frozen NF4 weights dequantized once (the same values the
        # 4-bit kernels compute with) instead of on every forward and backward pass (QUALITY.md: CPU step times).
        # The loss applies the frozen head at the reply's positions only, all at once (memory is not the limit).
        return TrainPlan("cpu", cfg.micro_batch_size, cfg.grad_accum, cfg.packing,
                         layers if cfg.gradient_checkpointing else 0, layers, "sdpa", True, None, None,
                         "CPU: config layout, frozen NF4 weights dequantized once, head applied at the reply tokens only",
                         loss_chunk_tokens=0, dequantized_base=cfg.load_in_4bit)
    if profile == "auto":
        profile = "gpu"
    if profile == "manual" or not cuda:
        why = "config as given" if profile == "manual" else f"profile {profile} needs CUDA; config as given"
        return TrainPlan("manual", cfg.micro_batch_size, cfg.grad_accum, cfg.packing,
                         layers if cfg.gradient_checkpointing else 0, layers, "sdpa", False, None, None, why)
    if shape is None or not lengths:
        raise ValueError("a GPU profile needs the model shape and the example lengths")
    effective = cfg.micro_batch_size * cfg.grad_accum
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(math.ceil(len(lengths) / effective) * cfg.epochs)
    compiled = bool(getattr(cfg, "compile", True)) and steps >= min_compile_steps
    eager = f", not compiled ({steps} steps repay no compile)" if getattr(cfg, "compile", True) and not compiled else ""
    card = memory_gib if memory_gib is not None else (card_memory_gib() or 0.0)
    budget = budget_gib(card)
    # Splits of the optimizer step into micro-batches, biggest first (fewest passes over the frozen weights).
    splits = [m for m in range(effective, 0, -1) if effective % m == 0]
    if profile == "low-memory":
        # Every layer checkpointed, frozen embedding/head in the compute dtype, small loss chunks: the weights
        # then take ~0.75 GiB less than the seed recipe's (fp32 embedding and head on a 7B), which pays for
        # packing the whole step into one micro-batch (measured: BENCHMARKS.md). Split only if the card is smaller.
        chunk = LOW_MEMORY_LOSS_CHUNK_TOKENS
        for m in splits:
            est = estimate_peak_gib(shape, longest_step_tokens(lengths, m), layers, loss_chunk=chunk)
            if not budget or est <= budget or m == 1:
                return TrainPlan("low-memory", m, effective // m, True, layers, layers, "varlen", True, round(est, 2),
                                 round(budget, 2) if budget else None,
                                 "all layers checkpointed, lean embedding/head, largest micro-batch that fits" + eager, chunk,
                                 compile=compiled, logging_steps=GPU_LOGGING_STEPS)
    # gpu: fewest micro-batches first, then fewest checkpointed layers, that fit the budget; then, if the same layout
    # still fits with the frozen weights dequantized (a card with memory to spare), cache them so.
    for m in splits:
        tokens = longest_step_tokens(lengths, m)
        for ckpt in range(0, layers + 1):
            est = estimate_peak_gib(shape, tokens, ckpt, compiled=compiled)
            if est <= budget:
                why = ("no checkpointing needed" if ckpt == 0 else f"checkpointing {ckpt} layers to fit") + (
                    f", whole step in one micro-batch" if m == effective else f", step split in {effective // m}") + eager
                est_deq = estimate_peak_gib(shape, tokens, ckpt, compiled=compiled, dequantized=True)
                dequantized = ckpt == 0 and est_deq <= card * DEQUANTIZED_HEADROOM
                if dequantized:
                    est, why = est_deq, why + ", memory to spare: frozen weights dequantized once"
                return TrainPlan("gpu", m, effective // m, True, ckpt, layers, "varlen", True, round(est, 2),
                                 round(budget, 2), why, compile=compiled, dequantized_base=dequantized,
                                 logging_steps=GPU_LOGGING_STEPS)
    est = estimate_peak_gib(shape, longest_step_tokens(lengths, 1), layers, compiled=compiled)
    return TrainPlan("gpu", 1, effective, True, layers, layers, "varlen", True, round(est, 2), round(budget, 2),
                     "card too small for the estimate; smallest layout" + eager, compile=compiled,
                     logging_steps=GPU_LOGGING_STEPS)


def apply_plan_to_config(cfg, plan: TrainPlan):
    """The config the Trainer and model loader see: micro-batch, accumulation, packing, checkpointing."""
    return cfg.replace(micro_batch_size=plan.micro_batch_size, grad_accum=plan.grad_accum, packing=plan.packing,
                       gradient_checkpointing=plan.gradient_checkpointing)


# --- out-of-memory back-off ------------------------------------------------------------------------------------
class DoesNotFit(RuntimeError):
    """Every layout the back-off tries ran out of memory."""


def split_at_most(effective: int, cap: int) -> int:
    """The largest micro-batch <= cap that divides the optimizer step exactly."""
    return max(m for m in range(1, min(cap, effective) + 1) if effective % m == 0)


def next_layout_after_oom(failed: TrainPlan) -> TrainPlan | None:
    """The layout to retry with after `failed` ran out of memory, or None when nothing smaller is left.

    Same examples per optimizer step every time (what is learned does not change). Cheapest memory first: drop the
    cached dequantized weights (4x the 4-bit weights' memory), then checkpoint every layer (recompute, same
    micro-batch), and only then halve the micro-batch of the attempt that failed, with more accumulation."""
    effective = failed.micro_batch_size * failed.grad_accum
    if failed.dequantized_base and failed.profile not in ("cpu", "manual"):
        return dataclasses.replace(failed, dequantized_base=False, estimated_peak_gib=None,
                                   reason=failed.reason + "; out of memory: frozen weights kept in 4 bits")
    if failed.checkpoint_layers < failed.total_layers and failed.profile not in ("cpu", "manual"):
        return dataclasses.replace(failed, checkpoint_layers=failed.total_layers, estimated_peak_gib=None,
                                   reason=failed.reason + "; out of memory: every layer checkpointed")
    if failed.micro_batch_size <= 1:
        return None
    micro = split_at_most(effective, failed.micro_batch_size // 2)
    return dataclasses.replace(failed, micro_batch_size=micro, grad_accum=effective // micro, estimated_peak_gib=None,
                               reason=failed.reason + f"; out of memory: micro-batch {micro}")


def short_layout(plan: TrainPlan) -> str:
    ckpt = f"checkpointing {plan.checkpoint_layers}/{plan.total_layers}" if plan.total_layers else (
        "checkpointing on" if plan.checkpoint_layers else "checkpointing off")
    return (f"{plan.micro_batch_size} x {plan.grad_accum}, {ckpt}"
            + (", dequantized weights" if plan.dequantized_base and plan.profile not in ("cpu", "manual") else ""))


def does_not_fit(tried: list[TrainPlan], card_gib: float | None, error: str) -> DoesNotFit:
    card = f"this {card_gib:.1f} GiB card" if card_gib else "this device"
    return DoesNotFit(f"training does not fit in the memory of {card}: out of memory with every layout tried ("
                      + "; ".join(short_layout(p) for p in tried) + f"). Last error: {error.splitlines()[0][:300]}. "
                      "Try `--profile low-memory`, a smaller `--max-seq-len`, or a larger card.")


