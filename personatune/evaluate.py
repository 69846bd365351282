"""Evaluation: held-out loss of base vs tuned, persona metrics on generated replies, a report and a plot.

Replies stop *during generation*: EOS and the scaffold marker `###` are stop criteria of the decoding
(`generate()`, or for greedy replies `greedy_decode` on a CPU and `static_greedy_decode` on a GPU), so the model never spends tokens writing the next `### User:` turn; `cut_reply` only strips the
marker that triggered the stop. The report also shows the run-on rate with EOS alone (the seed's setting, which
relied on trimming text afterwards), to make the stop criteria's effect visible. A `prompt_format: chat` adapter
is prompted through the base tokenizer's chat template and stops at its end-of-turn token instead.
Decoding is greedy by default and sampling is seeded: two evaluations of the same adapter give the same numbers.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import LogitsProcessorList, StopStringCriteria

from personatune.config import FinetuneConfig
from personatune.files import atomic_dir, is_complete
from personatune.decoding import (BasePromptPasses, Decoding, base_contrast_processor, generation_config, greedy_decode,
                                  prompt_pass, reply_losses, static_greedy_decode)
from personatune.metrics import distinct_n, loops, paired_similarity, reply_stats
from personatune.prompt import cut_reply, prompt_format_of, stop_strings
from personatune.tokenization import (IGNORE_INDEX, encode_prompt, encode_response, generation_eos, load_tokenized,
                                      load_tokenizer, stop_token_ids)
from personatune.train import collator, free_accelerator_memory

TRAIN_LOSS_ROWS = 64  # train loss is measured on the first 64 training rows (a fixed sample)
# Prompts per generation batch. On the 2-core CPU bigger batches cost less per prompt: the 136 evaluation prompts
# (golden + probes) took 45 s in one batch, 54 s in two, ~70 s in batches of 32, with the same replies (the tuned
# default with its base contrast; the base alone 26 / 33 / ~43 s; QUALITY.md, "Evaluation time on the CPU"); 144
# keeps both sets in one batch (a bigger model gets fewer rows: cpu_rows_that_fit). On a GPU a decoding step costs about
# the same for 32 or 128 prompts (it waits on launches, not arithmetic), so up to 256, as the memory holds them
# (rows_that_fit).
GENERATION_BATCH = 144
GPU_GENERATION_BATCH = 256
LOSS_BATCH = 16
# On a GPU the loss is taken over this many token positions at a time: their fp32 logits (and the softmax's copy)
# exist at once, not those of the whole batch (16 rows x 140 tokens x a 49k vocabulary is 0.9 GiB per fp32 copy).
LOGIT_CHUNK_TOKENS = 1024
# Bytes a batch row holds per (token x vocabulary entry) at the peak of a loss or of generation's first step:
# the logits in the compute dtype (2), their fp32 copy (4) and the softmax's (4).
LOGIT_BYTES = 10


BASE_PASS_BUDGET = 2 ** 30  # bytes of the base's prompt passes kept for the contrast (the embedded model's: ~0.3 GiB)
CPU_KV_BUDGET_GIB = 3.0  # KV cache a CPU generation batch may hold (the embedded model, 136 prompts + contrast: ~1.4 GiB)


def cpu_rows_that_fit(default: int, text_config, tokens_per_row: int, caches: int = 1,
                      budget_gib: float = CPU_KV_BUDGET_GIB) -> int:
    """Rows per CPU generation batch: `default`, or fewer when their fp32 KV caches (`caches` of them: 2 with the
    base contrast, 3 when prompt passes are reused) for `tokens_per_row` tokens would pass `budget_gib`: a 7B base on
    a CPU gets a few rows, not 144."""
    heads = getattr(text_config, "num_attention_heads", 1) or 1
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    per_row = text_config.num_hidden_layers * 2 * kv_heads * head_dim * 4 * max(1, tokens_per_row) * caches
    return max(1, min(default, int(budget_gib * 2 ** 30 // per_row)))


def rows_that_fit(default: int, tokens_per_row: int, vocab: int, free_bytes: int | None) -> int:
    """Rows per evaluation batch: `default`, or fewer when one row's logits (tokens x vocab x LOGIT_BYTES) would
    take more than half the free memory (`free_bytes`; None: no accelerator, the default as measured on CPU)."""
    if free_bytes is None:
        return default
    per_row = max(1, tokens_per_row) * vocab * LOGIT_BYTES
    return max(1, min(default, int(free_bytes * 0.5 // per_row)))


def in_batches(total: int, size: int, run) -> list:
    """`run(start, end)` over rows [0, total) in batches of `size`, results in order. A CUDA out-of-memory error
    retries that batch with half its rows (and keeps the smaller size for the rest), down to one row, then
    re-raises: the evaluation finishes on the memory it has instead of failing after training."""
    results, start = [], 0
    while start < total:
        end = min(start + size, total)
        try:
            results.append(run(start, end))
        except torch.cuda.OutOfMemoryError:
            if end - start <= 1:
                raise
            size = (end - start) // 2  # half the batch that failed
        else:
            start = end
            continue
        free_accelerator_memory()  # out of the except block: the failed batch's tensors are released
    return results


def free_cuda_bytes(device) -> int | None:
    """Memory this process may still allocate on `device` (the PERSONATUNE_GPU_MEMORY_GIB cap respected); None
    off CUDA."""
    if getattr(device, "type", None) != "cuda":
        return None
    from personatune.plan import GIB, memory_cap_gib

    free, total = torch.cuda.mem_get_info(device)
    unused_reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    limit = min(total, (memory_cap_gib() or total / GIB) * GIB) - torch.cuda.memory_allocated(device)
    return int(max(0, min(free + unused_reserved, limit)))


def summed_token_loss(logits, targets, chunk: int | None = None):
    """Summed fp32 cross-entropy of `logits` [rows, positions, vocab] against `targets` [rows, positions] (the
    token each position predicts, -100 ignored), optionally over `chunk` positions at a time."""
    flat = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    if not chunk or flat.shape[0] <= chunk:
        return torch.nn.functional.cross_entropy(flat.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return sum(torch.nn.functional.cross_entropy(flat[s:s + chunk].float(), targets[s:s + chunk],
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
               for s in range(0, flat.shape[0], chunk))


@torch.no_grad()
def mean_loss(model, dataset, tok, batch_size: int = LOSS_BATCH) -> float:
    """Mean cross-entropy per response token (prompt and padding are masked out). Rows go in batches of similar
    length (longest first), and the head is applied only at the positions where some row of the batch has a label
    (`logits_to_keep`): less padding and no prompt logits, the same value. On a GPU the batches are sized to the
    free memory, the logits taken in chunks, and a batch that runs out of memory is retried smaller."""
    model.eval()
    collate = collator(tok)
    device = next(model.parameters()).device
    rows = [dataset[i] for i in range(len(dataset))]
    rows.sort(key=lambda r: -len(r["input_ids"]))
    free = free_cuda_bytes(device)
    size = batch_size if free is None else rows_that_fit(
        batch_size, max((len(r["input_ids"]) for r in rows), default=1), model.config.get_text_config().vocab_size,
        free)
    chunk = LOGIT_CHUNK_TOKENS if device.type == "cuda" else None

    def run(start: int, end: int) -> tuple[float, int]:
        batch = collate(rows[start:end])
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = batch["labels"][:, 1:]  # position p predicts token p + 1
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        return summed_token_loss(logits, targets[:, keep], chunk).item(), int((targets != IGNORE_INDEX).sum())

    parts = in_batches(len(rows), size, run)
    return sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)


@torch.no_grad()
def generate_replies(model, tok, prompts: list[tuple[str, str]], decoding: Decoding = Decoding(), stop_markers: bool = True,
                     seed: int = 0, streamer=None, batch_size: int | None = None,
                     prompt_format: str = "scaffold", references: list[str] | None = None,
                     base_passes: BasePromptPasses | None = None, keep_base_passes: bool = False) -> list[dict]:
    """Replies to (instruction, user) prompts, batched with left padding, decoded with `decoding` (its token limit,
    sampling and repetition controls). A sampling decoding reseeds before each batch (`seed` + the batch's first
    index), so the replies to a fixed prompt list do not depend on what ran before.

    Each result says why generation ended: `eos`, `marker` (the `###` stop string) or `length`. With
    stop_markers=False only EOS stops generation (the seed's behaviour). `prompt_format` is the adapter's
    (personatune.prompt): `chat` prompts through the chat template and stops at its end-of-turn token (`eos`).

    Greedy and without a streamer, replies come from personatune's own loops, which decode by `decoding` alone (a
    model's own generation_config.json defaults are not read; generate() would add them): on a CPU `greedy_decode`
    (rows that end leave the batch; generate()'s tokens, tested), elsewhere `static_greedy_decode` (on CUDA each
    step a CUDA graph replay; the tokens generate() writes on the CPU tests, and 136 of 136 identical replies on an
    H200, though attention over the static cache's slots may round differently near a tie). A sliding-window model
    keeps generate() there. On a CPU each batch's prompt pass is also reused: with `references` (one reply per prompt) each
    result also holds `reference_loss`, the (summed loss, tokens) of that reference after the prompt; `base_passes`
    (one evaluation run's) keeps the pass when `keep_base_passes` (`model` is the base) and otherwise gives an
    adapter's contrast the base's pass over the same prompts.
    """
    if decoding.base_contrast and not hasattr(model, "disable_adapter"):
        raise ValueError("base_contrast decodes an adapter against its base: give a peft model with the adapter "
                         "active (for the base alone or a merged model use Decoding.without_contrast())")
    model.eval()
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tok, prompt_format)
    eos = generation_eos(tok, prompt_format)
    kwargs = dict(max_new_tokens=decoding.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                  use_cache=True, streamer=streamer, **decoding.generate_kwargs())
    if stop_markers and stop_strings(prompt_format):
        kwargs.update(stop_strings=stop_strings(prompt_format), tokenizer=tok)
    side = tok.padding_side
    tok.padding_side = "left"  # generation appends on the right, so prompts are padded on the left
    # On a GPU: as many prompts at once as the free memory holds (prompt + reply tokens); OOM retries smaller
    # split_special_tokens (in encode_prompt): a user's "<|im_start|>" (or the EOS string) stays text
    encoded = [encode_prompt(tok, i, u, prompt_format) for i, u in prompts]
    free = free_cuda_bytes(device)
    tokens_per_row = decoding.max_new_tokens + max((len(ids) for ids in encoded), default=1)
    text_config = model.config.get_text_config()
    own_loop = not decoding.sampling and streamer is None  # greedy_decode (CPU) or static_greedy_decode (else)
    reuse_prompt_pass = own_loop and device.type == "cpu"
    if free is None:
        # the batch's caches (2 with the base contrast), plus, reusing prompt passes, a kept or taken copy of the
        # base's: 3 for the base and for an adapter alike, so both split the prompts into the same batches and the
        # base's passes match the adapter's batches
        size = batch_size or cpu_rows_that_fit(GENERATION_BATCH, text_config, tokens_per_row,
                                               caches=3 if reuse_prompt_pass else 2 if decoding.base_contrast else 1)
    else:
        size = rows_that_fit(batch_size or GPU_GENERATION_BATCH, tokens_per_row, text_config.vocab_size, free)

    # a sliding-window cache is not the static one static_greedy_decode opens slot by slot: generate() decodes it
    static_loop = own_loop and not reuse_prompt_pass and not getattr(text_config, "sliding_window", None)
    stop = (StopStringCriteria(tok, stop_strings(prompt_format))
            if (reuse_prompt_pass or static_loop) and stop_markers and stop_strings(prompt_format) else None)
    replies = [encode_response(tok, r, prompt_format) for r in references] if references is not None else None

    def describe(start: int, end: int, new_tokens) -> list[dict]:
        return [_describe(tok, instruction, user, row, stop_ids, prompt_format)
                for (instruction, user), row in zip(prompts[start:end], new_tokens.tolist())]

    def run_from_prompt_pass(start: int, end: int, inputs) -> list[dict]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        first = prompt_pass(model, ids, mask)
        if keep_base_passes and base_passes is not None:
            base_passes.keep(first)
        losses = reply_losses(model, first, replies[start:end]) if replies is not None else None
        base = base_passes.get(ids, mask) if base_passes is not None and decoding.base_contrast else None
        results = describe(start, end, greedy_decode(model, first, decoding, stop_ids, tok.pad_token_id, stop, base))
        for result, loss in zip(results, losses or []):
            result["reference_loss"] = loss
        return results

    def run(start: int, end: int) -> list[dict]:
        inputs = tok.pad({"input_ids": encoded[start:end]}, return_tensors="pt").to(device)
        if reuse_prompt_pass:
            return run_from_prompt_pass(start, end, inputs)
        if static_loop:  # a GPU: each decoding step one CUDA graph replay
            return describe(start, end, static_greedy_decode(model, inputs["input_ids"], inputs["attention_mask"],
                                                             decoding, stop_ids, tok.pad_token_id, stop))
        if decoding.sampling:
            torch.manual_seed(seed + start)
        contrast = ({"logits_processor": LogitsProcessorList([base_contrast_processor(
            model, inputs["attention_mask"], decoding, eos)])} if decoding.base_contrast else {})
        out = model.generate(**inputs, **kwargs, **contrast)
        return describe(start, end, out[:, inputs["input_ids"].shape[1]:])

    try:
        return [r for part in in_batches(len(prompts), size, run) for r in part]
    finally:
        tok.padding_side = side


def _describe(tok, instruction: str, user: str, new_tokens: list[int], stop_ids: list[int], prompt_format: str) -> dict:
    end = next((k for k, t in enumerate(new_tokens) if t in stop_ids), len(new_tokens))
    raw = tok.decode(new_tokens[:end], skip_special_tokens=True)
    if "###" in raw and prompt_format == "scaffold":
        ended_by = "marker"  # stopped by the stop string (what follows is padding) or wrote one before EOS
    elif end < len(new_tokens):
        ended_by = "eos"
    else:
        ended_by = "length"
    return {"instruction": instruction, "user": user, "reply": cut_reply(raw, prompt_format), "raw": raw,
            "new_tokens": end + (end < len(new_tokens)), "ended_by": ended_by}


def generate_reply(model, tok, instruction: str, user: str, decoding: Decoding = Decoding(), **kwargs) -> dict:
    return generate_replies(model, tok, [(instruction, user)], decoding, **kwargs)[0]


EOS_ONLY_PROMPTS = 32  # the seed's EOS-only stopping is shown on the first golden prompts' replies


def eos_only_run_on_rate(replies: list[dict]) -> float:
    """The share of these replies that would run on with EOS as the only stop (the seed's setting), read from how
    each reply generated with the stop criteria ended: generation is the same token for token until the first stop,
    so a reply that ended by EOS ends there without the `###` criterion too, and one stopped by the marker or the
    token limit would have written the next turn or run to the limit (tests/test_decoding.py compares this with
    generating again without the marker)."""
    return sum(r["ended_by"] != "eos" for r in replies) / len(replies)


def load_eval_rows(path: str | Path) -> list[dict]:
    """instruction, user, response (the reference reply) of an evaluation CSV, validated like the quotes."""
    from personatune.data import load_quotes

    if not path:
        return []
    df = load_quotes(path)
    return [{"instruction": i, "user": u, "reference": r} for i, u, r in zip(df["instruction"], df["user"], df["response"])]


def eval_sets(cfg: FinetuneConfig) -> dict[str, list[dict]]:
    return {"golden": load_eval_rows(cfg.golden_csv), "probes": load_eval_rows(cfg.probes_csv)}


@torch.no_grad()
def reference_loss(model, tok, rows: list[dict], prompt_format: str = "scaffold") -> float | None:
    """Mean loss per token of the reference replies (and their EOS), the prompt masked: how likely the model finds
    what she would have said. Unlike the CSV's held-out split, an edit to quotes.csv cannot move it."""
    from personatune.tokenization import encode_example

    if not rows:
        return None
    encoded = [encode_example(tok, r["instruction"], r["user"], r["reference"], prompt_format) for r in rows]
    data = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels} for ids, labels in encoded]
    return mean_loss(model, data, tok)


SAMPLE_SEED_STRIDE = 1000  # reply sample j of a set is seeded seed + 1000 j (+ the batch's first index)


def score_model(model, tok, sets: dict[str, list[dict]], decoding: Decoding, similarity: bool = True,
                seed: int = 0, prompt_format: str = "scaffold", reply_samples: int = 1,
                base_passes: BasePromptPasses | None = None, is_base: bool = False) -> dict:
    """Loss on the references, replies, and reply metrics of one model on each evaluation set.

    A sampling decoding with reply_samples = k > 1 answers every prompt k times (seeded, so reproducible): a prompt's
    similarity is the mean over its k replies, loop and run-on rates count all of them, and distinct-2 is the mean
    over the k reply sets (each one reply per prompt, so it compares with a greedy set). Greedy answers once.
    Sample 0 is the single-sample evaluation's reply, and the one shown in reports.
    `base_passes`: the run's base prompt passes, kept when `is_base`, else read by the contrast (generate_replies).
    """
    k = reply_samples if decoding.sampling else 1
    scores: dict = {"decoding": decoding.to_dict(), "reply_samples": k, "sets": {}, "seconds": {}}
    all_sims, all_gens, by_sample = [], [], [[] for _ in range(k)]
    sets = {name: rows for name, rows in sets.items() if rows}
    started = time.perf_counter()
    replies = replies_per_set(model, tok, sets, decoding, seed, prompt_format, k, base_passes=base_passes,
                              is_base=is_base)
    scores["seconds"]["generate"] = round(time.perf_counter() - started, 2)
    for name, rows in sets.items():
        refs, runs = [r["reference"] for r in rows], replies[name]
        started = time.perf_counter()
        sims = ([paired_similarity([g["reply"] for g in gens], refs) for gens in runs] if similarity
                else [[None] * len(rows)] * k)
        compared = time.perf_counter()
        per_prompt = [_mean(list(s)) if similarity else None for s in zip(*sims)]
        gens = [g for run in runs for g in run]
        stats = {**reply_stats(gens), "distinct_1": mean_distinct(runs, 1), "distinct_2": mean_distinct(runs, 2)}
        # from the generation's prompt pass when it gave one (greedy on a CPU), else a pass over prompt + reference
        parts = [g.get("reference_loss") for g in runs[0]]
        loss = (sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1) if all(parts)
                else reference_loss(model, tok, rows, prompt_format))
        scores["seconds"][name] = {"similarity": round(compared - started, 2),
                                   "loss": round(time.perf_counter() - compared, 2)}
        scores["sets"][name] = {
            "loss": loss,
            "similarity": _mean(per_prompt) if similarity else None,
            **stats,
            "replies": [{"user": r["user"], "reply": g["reply"], "ended_by": g["ended_by"],
                         "loops": any(loops(run[i]) for run in runs), "similarity": s,
                         **({"samples": [run[i]["reply"] for run in runs]} if k > 1 else {})}
                        for i, (r, g, s) in enumerate(zip(rows, runs[0], per_prompt))],
        }
        all_sims += per_prompt
        all_gens += gens
        for j, run in enumerate(runs):
            by_sample[j] += run
    overall = reply_stats(all_gens)
    scores.update(persona_similarity=_mean(all_sims) if similarity and all_sims else None,
                  golden_loss=scores["sets"].get("golden", {}).get("loss"),
                  run_on_rate=overall["run_on_rate"], loop_rate=overall["loop_rate"],
                  distinct_2=mean_distinct(by_sample, 2) if all_gens else 0.0)
    return scores


def replies_per_set(model, tok, sets: dict[str, list[dict]], decoding: Decoding, seed: int = 0,
                    prompt_format: str = "scaffold", k: int = 1, joint: bool | None = None,
                    base_passes: BasePromptPasses | None = None, is_base: bool = False) -> dict[str, list[list[dict]]]:
    """k reply sets (sample j seeded seed + SAMPLE_SEED_STRIDE j) for each evaluation set. joint (default: greedy
    decoding): every set goes into the same generation batches, since a bigger batch costs less per prompt: on a GPU
    a decoding step waits on kernel launches, not arithmetic, so 136 prompts cost about what 64 do
    (bench/eval_gpu.py); on the CPU one batch of 136 took 45 s against ~70 s in batches of 32 (GENERATION_BATCH). A
    set's replies may then move with the other set's prompts (the padding of a shared batch; none moved in that
    measurement), which the score's cache key covers (it hashes every set). Sampling batches each set on its own,
    so a set's random draws depend on its own prompts only. Each row's reference goes along (generate_replies:
    its loss from the prompt pass, where one is reused), and `base_passes` / `is_base` as there."""
    if joint is None:
        joint = not decoding.sampling

    def sample_runs(rows: list[dict]) -> list[list[dict]]:
        prompts = [(r["instruction"], r["user"]) for r in rows]
        return [generate_replies(model, tok, prompts, decoding=decoding, seed=seed + j * SAMPLE_SEED_STRIDE,
                                 prompt_format=prompt_format, references=[r["reference"] for r in rows],
                                 base_passes=base_passes, keep_base_passes=is_base) for j in range(k)]

    if not joint:
        return {name: sample_runs(rows) for name, rows in sets.items()}
    runs = sample_runs([r for rows in sets.values() for r in rows])
    out, start = {}, 0
    for name, rows in sets.items():
        out[name] = [run[start:start + len(rows)] for run in runs]
        start += len(rows)
    return out


def mean_distinct(runs: list[list[dict]], n: int) -> float:
    """Distinct-n of each reply set (one reply per prompt), averaged over the sets: k sampled sets compare with
    one greedy set, where pooling them would count the same prompt's replies against each other."""
    return _mean([distinct_n([g["reply"] for g in run], n) for run in runs])


class EvaluationModels:
    """The frozen base that the evaluation stages of one flow run share: loaded ready for inference once
    (`load_inference_model`), each adapter put on it once under its own name. Scoring the base, the champion and the
    challenger and then the evaluation load the base once instead of three or four times (a 7B base on one H200:
    3.0-3.6 s a load from its own files, bench/eval_gpu.py; 1.0-1.1 s from the kept 4-bit copy, bench/load_gpu.py).
    Inside `active()` the base is scored with every adapter switched off and an adapter with it set active, so what
    was put on the model before does not change a stage's numbers (tests/test_flow.py compares them with stages that
    load their own). A stage given none loads its own. `close()` lets go of the
    model; an adapter that fails to load closes it too, so no half-built model is reused."""

    def __init__(self):
        self.key: tuple | None = None
        self.model = self.tok = None
        self.adapters: dict[str, str] = {}  # adapter folder -> its name on the model
        self.base_passes = BasePromptPasses(BASE_PASS_BUDGET)  # the base's prompt passes, for the contrast
        self.loads = 0
        self.load_seconds: dict[str, float] = {}  # the last load's: tokenizer, weights (to inference-ready)

    def base(self, resolved: str, cfg: FinetuneConfig):
        """(model, tokenizer): the base with every adapter put on it so far (`active()` picks one or none)."""
        key = (resolved, cfg.base_revision, cfg.load_in_4bit, cfg.compute_dtype)
        if key != self.key:
            self.close()  # another base: the old one goes before the new one loads
            started = time.perf_counter()
            tok = load_tokenizer(resolved, cfg.base_revision)
            self.load_seconds = {"tokenizer": round(time.perf_counter() - started, 2)}
            model = load_inference_model(resolved, cfg)
            self.load_seconds["weights"] = round(time.perf_counter() - started - self.load_seconds["tokenizer"], 2)
            self.key, self.model, self.tok, self.loads = key, model, tok, self.loads + 1
        return self.model, self.tok

    @contextmanager
    def active(self, resolved: str, cfg: FinetuneConfig, adapter_dir: str | Path | None = None):
        """(model, tokenizer) with the adapter of `adapter_dir` active, or (None) the base alone: its adapters, if any
        are on it, switched off while the block runs."""
        if adapter_dir:
            yield self.adapter(resolved, cfg, adapter_dir)[:2]
            return
        model, tok = self.base(resolved, cfg)
        if not self.adapters:
            yield model, tok
            return
        with model.disable_adapter():
            yield model, tok

    def adapter(self, resolved: str, cfg: FinetuneConfig, adapter_dir: str | Path) -> tuple:
        """(model, tokenizer, name): the base with the adapter of `adapter_dir` on it and active."""
        from peft import PeftModel

        model, tok = self.base(resolved, cfg)
        folder = str(Path(adapter_dir).resolve())
        if folder not in self.adapters:
            name = f"adapter{len(self.adapters)}"
            try:  # peft puts the LoRA layers on the base before it reads the weights: a failure leaves it half-built
                if self.adapters:
                    model.load_adapter(folder, adapter_name=name)
                else:
                    model = self.model = PeftModel.from_pretrained(model, folder, adapter_name=name)
            except BaseException:
                self.close()
                raise
            self.adapters[folder] = name
        model.set_adapter(self.adapters[folder])
        return model, tok, self.adapters[folder]

    def close(self) -> None:
        self.key = self.model = self.tok = None
        self.adapters = {}
        self.base_passes = BasePromptPasses(BASE_PASS_BUDGET)
        free_accelerator_memory()


def score_adapter(cfg: FinetuneConfig, resolved: str, adapter_dir: str | Path | None, out_dir: str | Path,
                  models: EvaluationModels | None = None) -> Path:
    """scores.json of the base (adapter_dir None) or of an adapter on the fixed evaluation sets. `models`: the
    base shared with the other evaluation stages of the run (None: this call loads its own)."""
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    started = time.perf_counter()
    models = models or EvaluationModels()
    # a champion bundle is prompted as it was trained (the challenger's stage folder and the base: as configured)
    prompt_format = prompt_format_of(adapter_dir, cfg.prompt_format) if adapter_dir else cfg.prompt_format
    loads = models.loads
    with models.active(resolved, cfg, adapter_dir) as (model, tok):
        loaded = time.perf_counter() - started
        base_load = dict(models.load_seconds) if models.loads > loads else None
        torch.manual_seed(cfg.seed)
        decoding = Decoding.from_config(cfg) if adapter_dir else Decoding.from_config(cfg).without_contrast()
        scores = score_model(model, tok, eval_sets(cfg), decoding, cfg.persona_similarity, cfg.seed, prompt_format,
                             cfg.reply_samples, base_passes=models.base_passes,
                             is_base=adapter_dir is None and cfg.base_contrast > 0)  # kept only for a contrast
    scores["adapter"] = str(adapter_dir) if adapter_dir else None
    scores["seconds"]["load"] = round(loaded, 2)
    if base_load:
        scores["seconds"]["base load"] = base_load
    print(f"Timing: score {'adapter' if adapter_dir else 'base'}: {json.dumps(scores['seconds'])}")
    with atomic_dir(out_dir) as tmp:
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return out_dir


INFERENCE_RESERVE_GIB = 4.0  # left free on a GPU after dequantizing: generation batches, KV cache, logits


def load_inference_model(resolved: str, cfg: FinetuneConfig):
    """The frozen base made fast for inference: its NF4 values in the compute dtype.

    The kept 4-bit copy (`load_base_model`) when there is one, then `fast_inference`: the fewest bytes to read. With
    none on a GPU, the weights load in the compute dtype and go through NF4 and back where they lie
    (`load_inference_base`, the same weights bit for bit) when they plus INFERENCE_RESERVE_GIB fit in what this
    process may allocate; otherwise (and on a CPU, where quantizing is the slow part) the 4-bit load and
    `fast_inference`. bench/load_gpu.py times the three."""
    from personatune.model import (checkpoint_elements, compute_dtype, load_base_model, load_inference_base,
                                   quantized_copy_dir)
    from personatune.plan import GIB

    copy = quantized_copy_dir(resolved, cfg) if cfg.load_in_4bit and cfg.keep_quantized_base else None
    if (copy is None or not is_complete(copy)) and torch.cuda.is_available():
        free = free_cuda_bytes(torch.device("cuda", torch.cuda.current_device()))
        elements = checkpoint_elements(resolved)
        if elements is not None and elements * compute_dtype(cfg.compute_dtype).itemsize + INFERENCE_RESERVE_GIB * GIB <= free:
            return load_inference_base(resolved, cfg)
    model = load_base_model(resolved, cfg)
    fast_inference(model)
    return model


def fast_inference(model) -> bool:
    """Dequantize the frozen 4-bit base once (the NF4 values, same logits) when the memory allows: on a CPU always
    (~3x faster generation), on a GPU when the dequantized weights plus INFERENCE_RESERVE_GIB fit in what this
    process may still allocate (`PERSONATUNE_GPU_MEMORY_GIB` respected). bitsandbytes otherwise dequantizes every
    weight again at every generated token. Returns whether it dequantized."""
    import bitsandbytes as bnb

    from personatune.model import dequantize_frozen_base
    from personatune.plan import GIB

    free = free_cuda_bytes(next(model.parameters()).device)
    if free is not None:
        extra = sum(m.in_features * m.out_features * torch.finfo(m.compute_dtype or torch.bfloat16).bits // 8
                    for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
        if extra + INFERENCE_RESERVE_GIB * GIB > free:
            return False
    dequantize_frozen_base(model)
    return True


def load_scores(scores_dir: str | Path | None) -> dict | None:
    return json.loads((Path(scores_dir) / "scores.json").read_text()) if scores_dir else None


def evaluate_adapter(cfg: FinetuneConfig, resolved: str, adapter_dir: str | Path, tokenized_dir: str | Path,
                     scores: dict[str, str | Path | None], out_dir: str | Path,
                     champion_dir: str | Path | None = None, models: EvaluationModels | None = None) -> Path:
    """eval.json, report.md and eval_plot.png: base, champion (when there is one) and challenger side by side.

    `scores` maps each role to its score_adapter folder (fixed evaluation sets); here the current CSV's held-out
    split and a training sample add their losses, an informational number (an edit to the CSV moves them).
    `models`: the base shared with the scoring stages (None: loaded here).
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    seconds, started = {}, time.perf_counter()
    models = models or EvaluationModels()
    data = load_tokenized(tokenized_dir)
    champion = models.adapter(resolved, cfg, champion_dir)[2] if champion_dir else None
    model, tok, challenger = models.adapter(resolved, cfg, adapter_dir)
    torch.manual_seed(cfg.seed)
    seconds["load"] = time.perf_counter() - started

    splits = {"eval": data["eval"], "train": data["train"].select(range(min(TRAIN_LOSS_ROWS, len(data["train"]))))}
    losses: dict = {"eval": {}, "train": {}}
    seconds["losses"] = {}

    def measure(split: str, side: str) -> None:
        t = time.perf_counter()
        losses[split][side] = mean_loss(model, splits[split], tok)
        seconds["losses"][f"{split} {side}"] = time.perf_counter() - t

    for split in splits:
        with model.disable_adapter():
            measure(split, "base")
        measure(split, "tuned")
    if champion:
        model.set_adapter(champion)
        try:
            measure("eval", "champion")
        finally:
            model.set_adapter(challenger)
    seconds["losses"] = {k: round(v, 2) for k, v in seconds["losses"].items()}
    print(f"Timing: evaluate: load {seconds['load']:.2f}, losses {json.dumps(seconds['losses'])} "
          f"({len(splits['eval'])} held-out and {len(splits['train'])} training rows)")

    sets = eval_sets(cfg)
    cards = {role: load_scores(path) for role, path in scores.items() if path}
    eos_only = cards["challenger"]["sets"].get("golden", {"replies": []})["replies"][:EOS_ONLY_PROMPTS]
    metrics = {role: _metrics(card, cards["base"]) for role, card in cards.items()}
    metrics["base"]["heldout_loss"], metrics["challenger"]["heldout_loss"] = losses["eval"]["base"], losses["eval"]["tuned"]
    if "champion" in metrics:
        metrics["champion"]["heldout_loss"] = losses["eval"].get("champion")
    challenger, base = cards["challenger"], cards["base"]
    probes = challenger["sets"].get("probes", {"replies": []})["replies"]
    base_probes = base["sets"].get("probes", {"replies": []})["replies"]
    champion_probes = cards["champion"]["sets"].get("probes", {"replies": []})["replies"] if "champion" in cards else []
    references = {r["user"]: r["reference"] for r in sets["probes"]}
    result = {
        "metrics": metrics,
        "eval_loss": losses["eval"],
        "train_loss": losses["train"],
        "eval_perplexity": {k: math.exp(v) for k, v in losses["eval"].items()},
        "eval_rows": len(data["eval"]),
        "train_rows": len(splits["train"]),
        "golden_rows": len(challenger["sets"].get("golden", {"replies": []})["replies"]),
        "probe_prompts": len(probes),
        "decoding": Decoding.from_config(cfg).to_dict(),
        "reply_samples": challenger.get("reply_samples", 1),
        "run_on_rate_eos_only": eos_only_run_on_rate(eos_only) if eos_only else None,
        "training": _training_summary(Path(adapter_dir) / "history.json"),
        "samples": [{"user": c["user"], "reference": references.get(c["user"]), "tuned": c["reply"],
                     "tuned_ended_by": c["ended_by"], "base": b["reply"], "base_ended_by": b["ended_by"],
                     "champion": ch["reply"] if ch else None}
                    for c, b, ch in zip(probes, base_probes, champion_probes or [None] * len(probes))][:cfg.num_samples],
        "probe_replies": [{"user": c["user"], "tuned": c["reply"], "tuned_ended_by": c["ended_by"], "base": b["reply"],
                           "base_ended_by": b["ended_by"], "champion": ch["reply"] if ch else None}
                          for c, b, ch in zip(probes, base_probes, champion_probes or [None] * len(probes))],
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_eval(result, Path(adapter_dir) / "history.json", tmp / "eval_plot.png")
        (tmp / "report.md").write_text(render_report(result, cfg))
        generation_config(tok, Decoding.from_config(cfg), cfg.prompt_format).save_pretrained(tmp)  # what every consumer decodes with
    return out_dir


def _metrics(card: dict, base: dict) -> dict:
    """The numbers of one model that the report shows and the release gate compares."""
    out = {k: card[k] for k in ("golden_loss", "persona_similarity", "run_on_rate", "loop_rate", "distinct_2")}
    for name, s in card["sets"].items():
        mine, theirs = s["replies"], base["sets"][name]["replies"]
        wins = ([a["similarity"] > b["similarity"] for a, b in zip(mine, theirs)]
                if mine and mine[0]["similarity"] is not None else [])
        out[name] = {k: s[k] for k in ("loss", "similarity", "loop_rate", "run_on_rate", "distinct_2", "mean_words")}
        out[name]["wins_vs_base"] = sum(wins) / len(wins) if wins else None
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _training_summary(history_path: Path) -> dict:
    if not history_path.is_file():  # an adapter from elsewhere (the Hub) may come without its history
        return {"steps": None, "first_loss": None, "last_loss": None, "resumed_from": None, "best_step": None}
    history = json.loads(history_path.read_text())
    losses = history["loss"]
    return {"steps": history["global_step"], "first_loss": losses[0]["loss"] if losses else None,
            "last_loss": losses[-1]["loss"] if losses else None, "resumed_from": history.get("resumed_from"),
            "best_step": history.get("best_step"), "best_eval_loss": history.get("best_eval_loss")}


ROLES = ("base", "champion", "challenger")


def plot_eval(result: dict, history_path: Path, png: Path) -> None:
    """Left: training loss and the held-out loss measured during training. Right: base, champion, challenger."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads(history_path.read_text()) if history_path.is_file() else {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    train = history.get("loss", [])
    ax1.plot([h["step"] for h in train], [h["loss"] for h in train], color="black", label="training loss")
    held = history.get("eval_loss", [])
    if held:
        ax1.plot([h["step"] for h in held], [h["eval_loss"] for h in held], "o-", color="tab:red", label="held-out loss")
        if history.get("best_step") is not None:
            ax1.axvline(history["best_step"], color="tab:red", linestyle=":", label="kept checkpoint")
    ax1.set(title="training (response tokens)", xlabel="optimizer step", ylabel="loss")
    ax1.legend(fontsize=8)
    m = result["metrics"]
    roles = [r for r in ROLES if r in m]
    names = ["golden loss", "persona similarity", "loop rate"]
    keys = ["golden_loss", "persona_similarity", "loop_rate"]
    width = 0.8 / len(roles)
    colors = {"base": "silver", "champion": "tab:blue", "challenger": "black"}
    for j, role in enumerate(roles):
        values = [m[role][k] if m[role][k] is not None else 0.0 for k in keys]
        ax2.bar([i - 0.4 + width * (j + 0.5) for i in range(len(keys))], values, width=width, label=role,
                color=colors[role])
    ax2.set_xticks(list(range(len(keys))), names)
    ax2.set_title("fixed evaluation sets")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _fmt(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def metric_table(result: dict) -> list[str]:
    """The three-way Markdown table (also used by the model card)."""
    m = result["metrics"]
    roles = [r for r in ROLES if r in m]
    rows = [("golden loss ({} rows, per reply token)".format(result["golden_rows"]), lambda r: r["golden_loss"], "{:.4f}"),
            ("persona similarity (golden + unseen probes)", lambda r: r["persona_similarity"], "{:.3f}"),
            ("unseen-topic probes: similarity", lambda r: r.get("probes", {}).get("similarity"), "{:.3f}"),
            ("unseen-topic probes: beats base", lambda r: r.get("probes", {}).get("wins_vs_base"), "{:.0%}"),
            ("unseen-topic probes: loop rate", lambda r: r.get("probes", {}).get("loop_rate"), "{:.1%}"),
            ("unseen-topic probes: distinct-2", lambda r: r.get("probes", {}).get("distinct_2"), "{:.2f}"),
            ("golden: similarity", lambda r: r.get("golden", {}).get("similarity"), "{:.3f}"),
            ("golden: beats base", lambda r: r.get("golden", {}).get("wins_vs_base"), "{:.0%}"),
            ("loop rate (all replies)", lambda r: r["loop_rate"], "{:.1%}"),
            ("run-on rate (marker written or token limit hit)", lambda r: r["run_on_rate"], "{:.1%}"),
            ("held-out loss of this CSV ({} rows; informational)".format(result["eval_rows"]),
             lambda r: r.get("heldout_loss"), "{:.4f}")]
    lines = ["| metric | " + " | ".join(roles) + " |", "|---" * (len(roles) + 1) + "|"]
    for name, get, fmt in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(get(m[r]), fmt) for r in roles) + " |")
    return lines


def render_report(result: dict, cfg: FinetuneConfig) -> str:
    t = result["training"]
    dec = result["decoding"]
    lines = [
        f"# Persona adapter report: {cfg.base_model}",
        "",
        "Base (untuned), champion (the live adapter, when there is one) and challenger (this run) on the same fixed "
        "sets: `data/golden.csv` (never trained on) and the unseen-topic probes `data/probes.csv`.",
        "",
        *metric_table(result),
        "",
        f"Decoding: {Decoding(**dec).describe()} (generation_config.json). "
        + (f"Each prompt was answered {result['reply_samples']} times (seeds {cfg.seed}, {cfg.seed} + "
           f"{SAMPLE_SEED_STRIDE}, ...): similarities and wins are per-prompt means, distinct-2 the mean over the "
           f"reply sets, loop and run-on rates count every reply; the replies shown are the first. "
           if result.get("reply_samples", 1) > 1 else "")
        + (f"With EOS as the only stop (the seed's setting) the challenger ran on in "
           f"{result['run_on_rate_eos_only']:.1%} of {min(EOS_ONLY_PROMPTS, result['golden_rows'])} golden prompts."
           if result["run_on_rate_eos_only"] is not None else ""),
        "",
        f"Training: {t['steps']} optimizer steps, logged loss {_fmt(t['first_loss'], '{:.4f}')} -> "
        f"{_fmt(t['last_loss'], '{:.4f}')}"
        + (f"; kept the checkpoint of step {t['best_step']} (held-out loss {t['best_eval_loss']:.4f})"
           if t.get("best_step") is not None and t.get("best_eval_loss") is not None else "") + ".",
        "",
        "![training curves and base / champion / challenger](eval_plot.png)",
        "",
        "## Sample replies (unseen-topic probes)",
    ]
    for s in result["samples"]:
        lines += ["", f"**User:** {s['user']}", "", f"- challenger ({s['tuned_ended_by']}): {s['tuned']}"]
        if s.get("champion") is not None:
            lines.append(f"- champion: {s['champion']}")
        lines += [f"- base ({s['base_ended_by']}): {s['base']}", f"- reference: {s['reference']}"]
    return "\n".join(lines) + "\n"
