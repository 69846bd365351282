"""Speed-ups that follow a training plan (personatune.plan): they change the loaded model in place, never what it
computes. Varlen flash attention per packed example, the lean frozen head with a chunked loss, per-layer activation
checkpointing, regional compilation, the dequantized frozen base; and the memory cap that lets a big card stand in
for a small one (`enforce_memory_cap`). Which of them a run gets is the plan's decision, made before the model is
loaded; `apply_plan` only carries it out.
"""
from __future__ import annotations

import torch

from personatune.plan import LOSS_CHUNK_TOKENS, TrainPlan, memory_cap_gib, memory_fraction

VARLEN_ATTENTION = "personatune_varlen"


def enforce_memory_cap(device: int | None = None) -> float | None:
    """With PERSONATUNE_GPU_MEMORY_GIB set, cap what this process may allocate on its CUDA card to that size
    (torch.cuda.set_per_process_memory_fraction): allocations past it raise a real CUDA out-of-memory error, as on
    a card of that size. Called wherever a model is loaded onto the card (every process and rank that uses CUDA).
    Returns the fraction set, None without CUDA or cap."""
    cap = memory_cap_gib()
    if not cap or not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device() if device is None else device
    fraction = memory_fraction(cap, torch.cuda.get_device_properties(device).total_memory)
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


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
    """Same value as transformers' ForCausalLMLoss (logits in fp32, labels shifted, -100 ignored).

    `chunk` > 0 (GPU plans): every position, in chunks of that many, recomputed in backward (peak memory of one
    chunk's logits instead of all of them). 0 (the CPU plan): the head applied only at the positions that have a
    label, all at once: the prompt's logits are never computed (55% of the shipped CSV's tokens). On a GPU that
    selection would make the host wait for the device every micro-batch (a boolean index), so it stays CPU-only."""
    from torch.utils.checkpoint import checkpoint

    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if not chunk:
        keep = shift != -100
        flat, shift = flat[keep], shift[keep]
        total = _chunk_ce(flat, weight, shift)  # no labelled position: an empty sum, still part of the graph
    else:
        total = flat.new_zeros((), dtype=torch.float32)
        for s in range(0, flat.shape[0], chunk):
            total = total + checkpoint(_chunk_ce, flat[s:s + chunk], weight, shift[s:s + chunk], use_reentrant=False)
    if num_items_in_batch is None:
        return total / (shift != -100).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def use_lean_head(inner, compute_dtype: torch.dtype | None, chunk: int) -> bool:
    """Replace the frozen lm_head by a `_LeanHead` in `compute_dtype` (None: the head's own) whose loss (`chunked_causal_lm_loss`) applies
    it in `chunk`-position pieces (0: at once, at the labelled positions only). A half compute dtype also keeps a
    frozen fp32 embedding in it when that is lossless. False (nothing changed) for a head it cannot take."""
    head = inner.get_output_embeddings()
    if not (isinstance(head, torch.nn.Linear) and head.bias is None):
        return False
    device = head.weight.device
    compute_dtype = compute_dtype or head.weight.dtype
    weight = head.weight.detach().cpu()          # off the card first: no fp32 + half copy at once
    inner.set_output_embeddings(torch.nn.Identity())
    del head
    lean = _LeanHead(weight.to(compute_dtype), device)
    inner.set_output_embeddings(lean)
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
    return True


def apply_plan(model, plan: TrainPlan, compute_dtype: torch.dtype) -> None:
    """Change the loaded (peft) model in place to follow the plan; `manual` changes nothing."""
    if plan.profile == "manual":
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if plan.dequantized_base:
        from personatune.model import dequantize_frozen_base

        dequantize_frozen_base(model)
    if plan.profile == "cpu":  # the config's layout and stock attention; the head keeps its own dtype
        if plan.lean_head:
            use_lean_head(inner, None, plan.loss_chunk_tokens)
        return
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
        use_lean_head(inner, compute_dtype, plan.loss_chunk_tokens)
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


def optimizer_without_host_syncs(args, model) -> tuple | None:
    """(class, kwargs) for the Trainer's `optimizer_cls_and_kwargs`: the optimizer `args.optim` names (the recipe's
    paged_adamw_8bit is bitsandbytes' AdamW with optim_bits=8, is_paged=True), with the same settings, but whose
    step() does not call torch.cuda.synchronize() after every parameter. bitsandbytes 0.50 does, 128 times a step
    for LoRA on q,v of 32 layers, and each one stops the host until the GPU has caught up (on 2 GPUs: until the
    other rank's all-reduce has come in), on a step the host's launches bound (BENCHMARKS.md, "Multi-GPU"). The
    update is the same: its kernels run in order on one stream, and a state of < 1e5 values (every LoRA matrix up
    to rank 24 on a 4,096-wide model) is never paged, so there is nothing to wait for; with a paged state the stock
    step runs. None for an optimizer that is not bitsandbytes'."""
    from transformers import Trainer

    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return None
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if not (isinstance(cls, type) and issubclass(cls, Optimizer8bit)):
        return None

    class WithoutHostSyncs(cls):
        @torch.no_grad()
        def step(self, closure=None):
            if any(getattr(t, "is_paged", False) for state in self.state.values() for t in state.values()):
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):  # bitsandbytes' Optimizer8bit.step, without the syncs
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
            return loss

    WithoutHostSyncs.__name__ = WithoutHostSyncs.__qualname__ = f"{cls.__name__}WithoutHostSyncs"
    return WithoutHostSyncs, kwargs
