"""Training profiles: how a run is laid out on the hardware it finds, without changing what is learned.

A profile never changes the recipe (examples per optimizer step, learning rate, schedule, epochs, LoRA): it only
chooses how the `micro_batch_size x grad_accum` examples of one optimizer step are computed. The optimizer sees
the same examples in the same order either way, and the loss is normalised by the number of response tokens of
the whole step, so the gradients are the same up to rounding.

| profile | where | what it does |
|---|---|---|
| `auto` (default) | CUDA | `gpu` |
| `auto` | CPU | `manual` (the CPU path is unchanged) |
| `gpu` | CUDA | bf16, padding-free packing, varlen flash attention, the whole optimizer step in one micro-batch, activation checkpointing on only as many layers as the card's memory needs, frozen lm_head kept in the compute dtype, chunked loss, decoder layers compiled (`compile`), and on a card with memory to spare the frozen NF4 weights cached dequantized in the compute dtype |
| `low-memory` | CUDA, small cards | the same, with every layer checkpointed and the weights kept in 4 bits: fits where the seed recipe fits |
| `manual` | anywhere | exactly the config's `micro_batch_size`, `grad_accum`, `gradient_checkpointing`, `packing`; stock SDPA attention |

`plan_training` is a pure function of the config, the model's shape, the examples' lengths and the card's memory, so
the choice is testable on a CPU (tests/test_profiles.py). `apply_plan` then changes the loaded model in place.
Measured numbers behind the memory model and the choices: BENCHMARKS.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

PROFILES = ("auto", "gpu", "low-memory", "manual")
VARLEN_ATTENTION = "personatune_varlen"
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
    estimated_peak_gib: float | None
    budget_gib: float | None
    reason: str
    loss_chunk_tokens: int = 1024  # tokens whose logits exist at once in the chunked loss
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
    """Memory of the current CUDA card; PERSONATUNE_GPU_MEMORY_GIB overrides it (size for a smaller card)."""
    override = os.environ.get("PERSONATUNE_GPU_MEMORY_GIB")
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def longest_step_tokens(lengths: list[int], examples: int) -> int:
    """Worst case tokens in one packed micro-batch: the `examples` longest examples together."""
    return sum(sorted(lengths, reverse=True)[:examples]) if lengths else 0


def plan_training(cfg, shape: ModelShape | None = None, lengths: list[int] | None = None,
                  memory_gib: float | None = None, cuda: bool | None = None) -> TrainPlan:
    """Choose micro-batch, accumulation, checkpointing and attention for `cfg.profile` on this card."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    profile = getattr(cfg, "profile", "auto")
    layers = shape.layers if shape else 0
    if profile == "auto" and not cuda:
        # The CPU default: the config's layout, with the frozen NF4 weights dequantized once (the same values the
        # 4-bit kernels compute with) instead of on every forward and backward pass (QUALITY.md: CPU step times).
        return TrainPlan("cpu", cfg.micro_batch_size, cfg.grad_accum, cfg.packing,
                         layers if cfg.gradient_checkpointing else 0, layers, "sdpa", False, None, None,
                         "CPU: config layout, frozen NF4 weights dequantized once", dequantized_base=cfg.load_in_4bit)
    if profile == "auto":
        profile = "gpu"
    if profile == "manual" or not cuda:
        why = "config as given" if profile == "manual" else f"profile {profile} needs CUDA; config as given"
        return TrainPlan("manual", cfg.micro_batch_size, cfg.grad_accum, cfg.packing,
                         layers if cfg.gradient_checkpointing else 0, layers, "sdpa", False, None, None, why)
    if shape is None or not lengths:
        raise ValueError("a GPU profile needs the model shape and the example lengths")
    effective = cfg.micro_batch_size * cfg.grad_accum
    compiled = bool(getattr(cfg, "compile", True))
    card = memory_gib if memory_gib is not None else (card_memory_gib() or 0.0)
    budget = card * HEADROOM
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
                                 "all layers checkpointed, lean embedding/head, largest micro-batch that fits", chunk,
                                 compile=compiled, logging_steps=GPU_LOGGING_STEPS)
    # gpu: fewest micro-batches first, then fewest checkpointed layers, that fit the budget; then, if the same layout
    # still fits with the frozen weights dequantized (a card with memory to spare), cache them so.
    for m in splits:
        tokens = longest_step_tokens(lengths, m)
        for ckpt in range(0, layers + 1):
            est = estimate_peak_gib(shape, tokens, ckpt, compiled=compiled)
            if est <= budget:
                why = ("no checkpointing needed" if ckpt == 0 else f"checkpointing {ckpt} layers to fit") + (
                    f", whole step in one micro-batch" if m == effective else f", step split in {effective // m}")
                est_deq = estimate_peak_gib(shape, tokens, ckpt, compiled=compiled, dequantized=True)
                dequantized = ckpt == 0 and est_deq <= card * DEQUANTIZED_HEADROOM
                if dequantized:
                    est, why = est_deq, why + ", memory to spare: frozen weights dequantized once"
                return TrainPlan("gpu", m, effective // m, True, ckpt, layers, "varlen", True, round(est, 2),
                                 round(budget, 2), why, compile=compiled, dequantized_base=dequantized,
                                 logging_steps=GPU_LOGGING_STEPS)
    est = estimate_peak_gib(shape, longest_step_tokens(lengths, 1), layers, compiled=compiled)
    return TrainPlan("gpu", 1, effective, True, layers, layers, "varlen", True, round(est, 2), round(budget, 2),
                     "card too small for the estimate; smallest layout", compile=compiled,
                     logging_steps=GPU_LOGGING_STEPS)


def apply_plan_to_config(cfg, plan: TrainPlan):
    """The config the Trainer and model loader see: micro-batch, accumulation, packing, checkpointing."""
    return cfg.replace(micro_batch_size=plan.micro_batch_size, grad_accum=plan.grad_accum, packing=plan.packing,
                       gradient_checkpointing=plan.gradient_checkpointing)


# --- runtime changes to the loaded model ----------------------------------------------------------------------
def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                             position_ids=None, **kwargs):
    """Causal flash attention per packed example (cu_seqlens), so no compute crosses example boundaries.

    query/key/value: [1, heads, tokens, head_dim] of one packed row; returns [1, tokens, heads, head_dim].
    Falls back to SDPA when there is no packing information or no CUDA (the CPU tests).
    """
    if cu_seq_lens_q is None and position_ids is not None and query.shape[0] == 1:
        starts = (position_ids[0] == 0).nonzero().flatten()
        cu_seq_lens_q = torch.cat([starts, starts.new_tensor([position_ids.shape[-1]])]).to(torch.int32)
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    if cu_seq_lens_q is None or not query.is_cuda or query.shape[0] != 1 or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is None and cu_seq_lens_q is not None and query.shape[0] == 1:
            # CPU / fallback: the same per-example causal attention as an explicit block-diagonal mask
            length = query.shape[2]
            bounds = cu_seq_lens_q.to(query.device)[1:-1]
            seg = torch.bucketize(torch.arange(length, device=query.device), bounds, right=True)
            idx = torch.arange(length, device=query.device)
            attention_mask = ((seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None]))[None, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else (
        torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16)
    q = query[0].transpose(0, 1).to(dtype).contiguous()   # [tokens, heads, dim]
    k = key[0].transpose(0, 1).to(dtype).contiguous()
    v = value[0].transpose(0, 1).to(dtype).contiguous()
    cu_q = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_q if cu_seq_lens_k is None else cu_seq_lens_k.to(device=q.device, dtype=torch.int32)
    max_q = int(max_length_q)
    max_k = int(max_length_k) if max_length_k is not None else max_q
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout if module.training else 0.0,
                                                  True, False, scale=scaling)[0]
    return out.unsqueeze(0), None


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)


class _LeanHead(torch.nn.Module):
    """Frozen lm_head in the compute dtype. While training it passes hidden states through and the loss applies
    the head in chunks (`chunked_causal_lm_loss`), so the full [tokens, vocab] logits never exist at once."""

    def __init__(self, weight: torch.Tensor, device):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
        self.defer = True

    def forward(self, hidden):
        if self.defer and self.training:
            return hidden
        return torch.nn.functional.linear(hidden, self.weight)


def _chunk_ce(hidden, weight, labels):
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), labels,
                                             ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(hidden, labels, weight, num_items_in_batch=None, chunk: int = LOSS_CHUNK_TOKENS):
    """Same value as transformers' ForCausalLMLoss (logits in fp32, labels shifted, -100 ignored), computed in
    token chunks that are recomputed in backward: peak memory of one chunk's logits instead of all of them."""
    from torch.utils.checkpoint import checkpoint

    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = flat.new_zeros((), dtype=torch.float32)
    for s in range(0, flat.shape[0], chunk):
        total = total + checkpoint(_chunk_ce, flat[s:s + chunk], weight, shift[s:s + chunk], use_reentrant=False)
    if num_items_in_batch is None:
        return total / (shift != -100).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def apply_plan(model, plan: TrainPlan, compute_dtype: torch.dtype) -> None:
    """Change the loaded (peft) model in place to follow the plan; `manual` changes nothing."""
    if plan.profile == "manual":
        return
    if plan.profile == "cpu":
        if plan.dequantized_base:
            from personatune.model import dequantize_frozen_base

            dequantize_frozen_base(model)
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if plan.dequantized_base:
        from personatune.model import dequantize_frozen_base

        dequantize_frozen_base(model)
    if plan.attention == "varlen":
        register_varlen_attention()
        for cfg in {id(c): c for c in (inner.config, getattr(inner.config, "text_config", None)) if c is not None}.values():
            cfg._attn_implementation = VARLEN_ATTENTION
    # Selective checkpointing: the last `checkpoint_layers` decoder layers recompute, the others keep activations.
    layers = [m for m in decoder_layers(inner) if hasattr(m, "gradient_checkpointing")]
    if plan.checkpoint_layers and layers:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        keep = len(layers) - plan.checkpoint_layers
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i >= keep
    if plan.lean_head:
        head = inner.get_output_embeddings()
        if isinstance(head, torch.nn.Linear) and head.bias is None:
            device = head.weight.device
            weight = head.weight.detach().cpu()          # off the card first: no fp32 + half copy at once
            inner.set_output_embeddings(torch.nn.Identity())
            del head
            lean = _LeanHead(weight.to(compute_dtype), device)
            inner.set_output_embeddings(lean)
            chunk = plan.loss_chunk_tokens
            embed = inner.get_input_embeddings()
            half = compute_dtype in (torch.bfloat16, torch.float16)
            if half and isinstance(embed, torch.nn.Embedding) and embed.weight.dtype == torch.float32 and not embed.weight.requires_grad:
                w32 = embed.weight.detach().cpu()
                if torch.equal(w32.to(compute_dtype).float(), w32):  # loaded in the compute dtype: lossless
                    embed.weight.data = torch.empty(0)
                    embed.weight.data = w32.to(compute_dtype).to(device)
                    embed.register_forward_hook(lambda module, inputs, output: output.float())  # fp32 stream as before

            def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, **kwargs):
                if lean.defer and lean.training:  # `logits` are the final hidden states: apply the head in chunks
                    return chunked_causal_lm_loss(logits, labels, lean.weight, num_items_in_batch, chunk=chunk)
                from transformers.loss.loss_utils import ForCausalLMLoss

                return ForCausalLMLoss(logits, labels, vocab_size or logits.shape[-1], num_items_in_batch, **kwargs)

            inner.loss_function = loss_function
    if plan.compile:
        compile_layers(inner)


def decoder_layers(model) -> list:
    return [m for m in model.modules() if m.__class__.__name__.endswith("DecoderLayer")]


def compile_layers(model, **kwargs) -> int:
    """Regional compilation: torch.compile each decoder layer in place (the module tree and state dict keys stay
    as they are, so adapters save as before). The layers share one compiled graph; packed rows of a new length
    recompile once, after which lengths are dynamic. bitsandbytes' 4-bit ops are torch custom ops, so the 4-bit
    path traces without graph breaks (measured: no breaks on Llama, BENCHMARKS.md)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**kwargs)
    return len(layers)
