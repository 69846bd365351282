"""How replies are decoded, once for everyone: evaluation, `flows.chat`, the bundle's generation_config.json.

Greedy decoding of a small tuned model falls into loops ("I'll tell you what to say. I'll tell you what to say.
..."). The repetition controls below were chosen by measurement on the unseen-topic probes (QUALITY.md,
"Decoding"); sampling (temperature > 0) is measured there too and off by default. Sampling is seeded per
generation batch (`seed`), so two evaluations of the same adapter on the same machine still give the same replies.
The values travel with every adapter as `generation_config.json`, so a consumer that loads the bundle (or the
Hub repo) decodes exactly as the evaluation measured.

Base contrast (`base_contrast` = beta > 0): each step scores the tuned model's next-token log-probabilities against
the base model's (the same model with the adapter switched off), (1 + beta) log p_tuned - beta log p_base, over the
tokens the tuned model itself finds plausible (p_tuned >= CONTRAST_PLAUSIBILITY x its best token's). That is
contrastive decoding (Li et al., 2023; O'Brien and Lewis, 2023) with the untuned base as the amateur: what the
adapter learned is amplified and the base's stock phrasing ("I'll take ...", "it's not ...") is held back. It
costs one more forward pass of the base a step, and it needs the base: a merged or GGUF export decodes without it.
Measured in QUALITY.md ("Base contrast").
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from personatune.prompt import stop_strings

GENERATION_CONFIG = "generation_config.json"
CONTRAST_PLAUSIBILITY = 0.1  # base contrast: only tokens with p_tuned >= 0.1 x the best token's (measured, QUALITY.md)


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 64
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass when sampling
    base_contrast: float = 0.0  # beta of the contrast with the base (0 = off); an adapter's decoding only

    @classmethod
    def from_config(cls, cfg) -> "Decoding":
        return cls(cfg.max_new_tokens, cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.temperature, cfg.top_p,
                   cfg.base_contrast)

    def without_contrast(self) -> "Decoding":
        """The same decoding without the contrast with the base: for the base itself, or a merged model."""
        return replace(self, base_contrast=0.0)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def describe(self) -> str:
        how = f"sampled (temperature {self.temperature}, top-p {self.top_p}, seeded)" if self.sampling else "greedy"
        contrast = f", contrasted with the base (beta {self.base_contrast:g})" if self.base_contrast else ""
        return (f"{how}{contrast}, repetition penalty {self.repetition_penalty}, no-repeat n-gram size "
                f"{self.no_repeat_ngram_size}, at most {self.max_new_tokens} new tokens")

    def generate_kwargs(self) -> dict:
        """The sampling and repetition controls in `model.generate()` keywords (only those that are switched on)."""
        kwargs: dict = {"do_sample": self.sampling}
        if self.sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size > 0:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)


def generation_config(tok, decoding: Decoding, prompt_format: str = "scaffold"):
    """A `transformers.GenerationConfig`: EOS = pad = the tokenizer's EOS, the `###` stop string (scaffold) or the
    chat template's end-of-turn token (chat; one EOS id when they coincide), the sampling and repetition controls;
    `save_pretrained(folder)` writes generation_config.json."""
    from transformers import GenerationConfig

    from personatune.tokenization import generation_eos

    stops = {"stop_strings": stop_strings(prompt_format)} if stop_strings(prompt_format) else {}
    # base_contrast is personatune's (plain generate() ignores it): generate_replies reads it back, load_decoding too
    contrast = {"base_contrast": decoding.base_contrast} if decoding.base_contrast else {}
    return GenerationConfig(max_new_tokens=decoding.max_new_tokens, eos_token_id=generation_eos(tok, prompt_format),
                            pad_token_id=tok.pad_token_id, **stops, **decoding.generate_kwargs(), **contrast)


def load_decoding(folder: str | Path, default: Decoding | None = None) -> Decoding:
    """The decoding settings stored with an adapter (generation_config.json), else `default` (the config's)."""
    path = Path(folder) / GENERATION_CONFIG
    default = default or Decoding()
    if not path.is_file():
        return default
    data = json.loads(path.read_text())
    sampling = bool(data.get("do_sample", False))
    return Decoding(int(data.get("max_new_tokens", default.max_new_tokens)),
                    float(data.get("repetition_penalty", 1.0)), int(data.get("no_repeat_ngram_size", 0)),
                    float(data.get("temperature", 1.0)) if sampling else 0.0,
                    float(data.get("top_p", 1.0)) if sampling else 1.0, float(data.get("base_contrast", 0.0)))


@functools.lru_cache(maxsize=1)
def generate_ignores_left_padding() -> bool:
    """Whether this transformers' generate() leaves a left-padded row's padding out of its repetition penalty (it
    hands RepetitionPenaltyLogitsProcessor the padding lengths: transformers 5.2x). Older ones (5.17) penalize the
    padding with the prompt, and their processor takes no per-row lengths. Read from generate()'s source; without
    the source, from whether the processor's signature admits a tensor of lengths."""
    import inspect

    from transformers import RepetitionPenaltyLogitsProcessor
    from transformers.generation.utils import GenerationMixin

    try:
        return "prompt_ignore_length" in inspect.getsource(GenerationMixin._get_logits_processor)
    except (OSError, TypeError):  # installed without sources
        param = inspect.signature(RepetitionPenaltyLogitsProcessor).parameters.get("prompt_ignore_length")
        return param is not None and "Tensor" in str(param.annotation)


def base_contrast_processor(model, attention_mask, decoding: Decoding, eos_ids: int | list[int] | tuple = (),
                            plausibility: float = CONTRAST_PLAUSIBILITY, penalize_padding: bool | None = None):
    """A logits processor for `model.generate()` on a peft model: replaces the tuned model's scores by
    (1 + beta) log p_tuned - beta log p_base over the plausible tokens (-inf elsewhere), beta =
    `decoding.base_contrast`. generate() hands it the tuned scores after its repetition penalty and before its
    sampling warpers (temperature, top-p: they then act on the contrast), so the base's logits get the same penalty:
    with an adapter that changes nothing, greedy replies stay as they are. The base's log-probabilities come from
    the same model with its adapters switched off, run one token a step on its own KV cache; `attention_mask` is the
    prompt batch's (left padding). A row that has written one of `eos_ids` (generate's EOS ids: it pads a finished
    row from then on) leaves the base's batch and cache: its scores no longer choose anything, so they pass through
    unchanged. `penalize_padding`: whether the repetition penalty counts the left padding, as generate() does for
    the tuned scores (None: as this transformers' generate() does, `generate_ignores_left_padding`). One processor
    per generate() call."""
    import torch
    from transformers import DynamicCache, LogitsProcessor

    beta = decoding.base_contrast
    penalized = repetition_penalty(decoding, attention_mask, penalize_padding)
    cache_kw = cache_keyword(model)
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else eos_ids
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long, device=attention_mask.device)

    class BaseContrast(LogitsProcessor):
        def __init__(self):
            self.mask, self.cache, self.seen = attention_mask, DynamicCache(config=model.config), 0
            self.rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)  # rows in the base's cache

        @torch.no_grad()
        def __call__(self, input_ids, scores):
            new = input_ids[:, self.seen:]  # the prompt at the first step, then the token just chosen
            if self.seen:
                # a live row whose newest token is an EOS has ended (rows that ended before left the cache already)
                done = torch.isin(new[self.rows], eos).any(dim=1) if eos.numel() else None
                if done is not None and bool(done.any()):
                    if bool(done.all()):
                        return scores  # every row has ended: generate() stops after this step
                    live = (~done).nonzero().flatten()
                    self.cache.batch_select_indices(live)
                    self.mask, self.rows = self.mask[live], self.rows[live]
                self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], new.shape[1]))], dim=1)
            self.seen = input_ids.shape[1]
            positions = _positions(self.mask, new.shape[1])
            with model.disable_adapter():
                out = model(input_ids=new[self.rows], attention_mask=self.mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{cache_kw: self.cache})  # the prompt's last position only
            base = penalized(input_ids[self.rows], out.logits[:, -1].float(), self.rows)
            result = scores.clone()
            result[self.rows] = contrast_scores(scores[self.rows].float(), base, beta, plausibility).to(scores.dtype)
            return result

    return BaseContrast()


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache: transformers renamed it (past_key_values -> cache) within the supported
    range."""
    import inspect

    forward = (model.get_base_model() if hasattr(model, "get_base_model") else model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def repetition_penalty(decoding: Decoding, attention_mask, penalize_padding: bool | None = None):
    """`penalize(input_ids, logits, rows)`: the repetition penalty as this transformers' generate() applies it to a
    left-padded batch (`attention_mask`, the prompts'), for the batch rows `rows` (a tensor of indices): newer ones
    leave the left padding (EOS) out (prompt_ignore_length = the padding lengths), older ones penalize it with the
    prompt. `penalize_padding` overrides which (None: as generate() does, `generate_ignores_left_padding`)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    if penalize_padding is None:
        penalize_padding = not generate_ignores_left_padding()
    ignore = None if penalize_padding else (attention_mask != 0).int().argmax(dim=1)

    def penalize(input_ids, logits, rows):
        if decoding.repetition_penalty == 1.0:
            return logits
        extra = {} if ignore is None else {"prompt_ignore_length": ignore[rows]}
        return RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty, **extra)(input_ids, logits)

    return penalize


def contrast_scores(tuned_logits, base_logits, beta: float, plausibility: float = CONTRAST_PLAUSIBILITY):
    """(1 + beta) log p_tuned - beta log p_base over the tokens with p_tuned >= `plausibility` x the best token's,
    -inf elsewhere (both logits already penalized; fp32)."""
    import torch

    tuned = torch.log_softmax(tuned_logits, dim=-1)
    base = torch.log_softmax(base_logits, dim=-1)
    plausible = tuned >= tuned.max(dim=-1, keepdim=True).values + math.log(plausibility)
    return torch.where(plausible, (1 + beta) * tuned - beta * base, torch.full_like(tuned, -math.inf))


# Greedy decoding from a prompt pass: the evaluation's path on a CPU. generate() keeps every row of a batch in every
# step, padding the rows that have ended; here a row that ends leaves the batch and its KV cache, so a step costs what
# the rows still writing cost (on the 2-core CPU, where a step is arithmetic, the base's 136 evaluation prompts took
# 26 s against generate()'s 33 s, with the same replies: QUALITY.md, "Evaluation time on the CPU"). The prompt pass
# it starts from is kept apart, so the loss of the reference replies reuses it (only their tokens are computed) and
# the base's pass serves the adapter's contrast with the base in a later stage.

@dataclass
class PromptPass:
    """One forward pass of a model over a left-padded prompt batch: its KV cache and the fp32 next-token logits at
    the last prompt position (what the first reply token is chosen from)."""
    ids: object  # [rows, prompt tokens], left-padded
    mask: object
    cache: object  # transformers' DynamicCache after the prompt
    logits: object  # [rows, vocab], fp32

    def copy(self) -> "PromptPass":
        """A copy whose cache can grow (decoding and losses append to the cache they are given)."""
        return PromptPass(self.ids, self.mask, copy.deepcopy(self.cache), self.logits)


def _rows_of(cache, idx):
    """A cache of the rows `idx` of the DynamicCache `cache`, which stays as it is: each layer object is copied (not
    its tensors) and the copy selects the rows, and transformers' dynamic layers select and later grow by making new
    tensors. So only the selected rows are copied, not the whole prompt cache (0.5 MiB a prompt token on a 7B: 32
    layers x keys and values x 4,096 bf16 numbers, so GiBs for the evaluation's prompts)."""
    picked = copy.copy(cache)
    picked.layers = [copy.copy(layer) for layer in cache.layers]
    picked.batch_select_indices(idx)
    return picked


def _positions(mask, new: int):
    return (mask.cumsum(1) - 1).clamp(min=0)[:, -new:]


def _next_logits(model, ids, mask, cache, cache_kw: str):
    import torch

    # the last position by index, not `logits_to_keep=1`: that slices a strided view of the hidden states, and on a
    # CPU the head's product over it differed by up to 4e-5 between the base and the same base under peft with its
    # adapters switched off; by index (a contiguous copy, as the losses take them) the two agree exactly
    last = torch.tensor([ids.shape[1] - 1], device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask, ids.shape[1]), use_cache=True,
                logits_to_keep=last, **{cache_kw: cache})
    return out.logits[:, -1].to(copy=True, dtype=torch.float32)


def prompt_pass(model, ids, mask) -> PromptPass:
    """The model's pass over the prompts `ids` (left-padded, `mask`); a peft model's active adapter (or none, inside
    `disable_adapter()`) decides whose pass it is."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        return PromptPass(ids, mask, cache, _next_logits(model, ids, mask, cache, cache_keyword(model)))


class BasePromptPasses:
    """The base model's prompt passes of one evaluation run, by prompt batch: the base's scoring stage keeps each
    one, and an adapter decoded in contrast with the base starts the base's side from it instead of running the
    base over the same prompts again (on the 2-core CPU, one pass over the 136 evaluation prompts is ~10 s). Up to
    `budget_bytes` of KV cache are kept; a batch beyond it is not (its contrast runs its own pass)."""

    def __init__(self, budget_bytes: int):
        self.budget, self.passes = budget_bytes, {}

    @staticmethod
    def _key(ids, mask) -> str:
        return hashlib.sha256(ids.cpu().numpy().tobytes() + b"|" + mask.cpu().numpy().tobytes()).hexdigest()

    def keep(self, start: PromptPass) -> None:
        size = _cache_bytes(start.cache)
        if size + sum(_cache_bytes(p.cache) for p in self.passes.values()) <= self.budget:
            self.passes[self._key(start.ids, start.mask)] = start.copy()

    def get(self, ids, mask) -> PromptPass | None:
        """A copy of the base's pass over exactly these prompts, or None."""
        kept = self.passes.get(self._key(ids, mask))
        return kept.copy() if kept else None


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _next_token_scorer(decoding: Decoding, mask):
    """`score(seq, tuned_logits, base_logits, rows)`: the scores a greedy step takes its argmax of, for the batch rows
    `rows` (their tokens so far `seq`): the repetition penalty, no-repeat n-grams, then the contrast with the base
    (when `decoding` has one; `base_logits` unused otherwise). The two greedy loops below share it."""
    from transformers import NoRepeatNGramLogitsProcessor

    penalize = repetition_penalty(decoding, mask)
    no_repeat = NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size) if decoding.no_repeat_ngram_size else None

    def score(seq, tuned_logits, base_logits, rows):
        scores = penalize(seq, tuned_logits, rows)
        if no_repeat:
            scores = no_repeat(seq, scores)
        if decoding.base_contrast:
            scores = contrast_scores(scores, penalize(seq, base_logits, rows), decoding.base_contrast)
        return scores

    return score


def greedy_decode(model, start: PromptPass, decoding: Decoding, stop_ids: list[int], pad_id: int,
                  stop_criteria=None, base: PromptPass | None = None):
    """Greedy replies to the prompts of `start` (the model's own pass, whose cache it consumes): [rows,
    decoding.max_new_tokens] new token ids, each row ended by one of `stop_ids` or by `stop_criteria` (transformers'
    StopStringCriteria: the `###` marker) and padded with `pad_id` after. The same tokens as `model.generate()`
    with the same settings (tests/test_decoding.py), with the repetition penalty and no-repeat n-gram size of
    `decoding` and, when it has a base contrast, the base (adapter switched off) scored alongside from `base` (its
    pass over the same prompts; None: run here)."""
    import torch

    cache_kw, beta = cache_keyword(model), decoding.base_contrast
    if beta and base is None:
        with model.disable_adapter():
            base = prompt_pass(model, start.ids, start.mask)
    score = _next_token_scorer(decoding, start.mask)
    stops = torch.tensor(sorted(set(stop_ids)), device=start.ids.device)
    rows = start.ids.shape[0]
    out = torch.full((rows, decoding.max_new_tokens), pad_id, dtype=torch.long, device=start.ids.device)
    seq, mask, live = start.ids, start.mask, torch.arange(rows, device=start.ids.device)
    tuned_logits, base_logits = start.logits, base.logits if beta else None
    caches = [start.cache] + ([base.cache] if beta else [])
    with torch.no_grad():
        for step in range(decoding.max_new_tokens):
            scores = score(seq[live], tuned_logits, base_logits, live)
            chosen = scores.argmax(dim=-1)
            out[live, step] = chosen
            seq = torch.cat([seq, seq.new_full((rows, 1), pad_id)], dim=1)
            seq[live, -1] = chosen
            ended = torch.isin(chosen, stops)
            if stop_criteria is not None:
                ended |= stop_criteria(seq[live], scores).to(ended.device)
            if bool(ended.all()) or step + 1 == decoding.max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            if bool(ended.any()):
                writing = (~ended).nonzero().flatten()
                for cache in caches:
                    cache.batch_select_indices(writing)
                mask, live, chosen = mask[writing], live[writing], chosen[writing]
            tuned_logits = _next_logits(model, chosen[:, None], mask, start.cache, cache_kw)
            if beta:
                with model.disable_adapter():
                    base_logits = _next_logits(model, chosen[:, None], mask, base.cache, cache_kw)
    return out


def reply_losses(model, start: PromptPass, replies: list[list[int]], logits_bytes: int = 2 ** 28) -> list[tuple[float, int]]:
    """(summed cross-entropy, tokens) of each row's `replies` tokens after its prompt, from the model's pass over
    the prompts (`start`, left unchanged): only the reply tokens are run, on copies of the prompt cache, in groups
    of rows whose fp32 logits stay under `logits_bytes`. The same numbers as a forward pass over prompt + reply
    (tests/test_decoding.py), for about half the arithmetic of the evaluation's reference losses."""
    import torch

    cache_kw = cache_keyword(model)
    device = start.ids.device
    first = torch.tensor([r[0] if r else -100 for r in replies], device=device)
    head = torch.nn.functional.cross_entropy(start.logits, first, ignore_index=-100, reduction="none")
    sums = head.tolist()
    counts = [len(r) for r in replies]
    width = max((len(r) - 1 for r in replies), default=0)
    if width > 0:
        per_row = width * start.logits.shape[-1] * 4
        group = max(1, min(len(replies), logits_bytes // per_row))
        for lo in range(0, len(replies), group):
            idx = list(range(lo, min(lo + group, len(replies))))
            inputs = torch.zeros((len(idx), width), dtype=torch.long, device=device)
            targets = torch.full((len(idx), width), -100, dtype=torch.long, device=device)
            typed = torch.zeros((len(idx), width), dtype=start.mask.dtype, device=device)
            for j, i in enumerate(idx):
                n = len(replies[i]) - 1
                if n > 0:
                    inputs[j, :n] = torch.tensor(replies[i][:-1])
                    targets[j, :n] = torch.tensor(replies[i][1:])
                    typed[j, :n] = 1
            cache = _rows_of(start.cache, torch.tensor(idx, device=device))
            mask = torch.cat([start.mask[idx], typed], dim=1)
            with torch.no_grad():
                logits = model(input_ids=inputs, attention_mask=mask, position_ids=_positions(mask, width),
                               use_cache=True, **{cache_kw: cache}).logits
            # over the last dimension: CPU cross-entropy over a transposed [rows, vocab, tokens] tensor differed by
            # ~1e-4 a token from a full forward's loss; this way it agrees to ~1e-6 (tests/test_decoding.py)
            losses = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       ignore_index=-100, reduction="none").view(len(idx), width).sum(dim=1)
            for j, i in enumerate(idx):
                sums[i] += losses[j].item()
    return [(s if c else 0.0, c) for s, c in zip(sums, counts)]


# Greedy decoding on a GPU: a static KV cache and one CUDA graph per decoding step and model side. There a step waits
# on kernel launches, not arithmetic (~3,000 launches a step for the 7B-shaped model and its contrast, bench/eval_gpu.py);
# a graph replays the step's launches at once. On one H200, the 136 evaluation prompts of the 7B-shaped model took
# 2.3 s with the contrast and 1.0 s for the base, against generate()'s 6.5 s and 2.1 s, with the same replies
# (bench/results/graph_decode_gpu_20261130.json). Every row stays in the batch (static shapes).

def static_greedy_decode(model, ids, mask, decoding: Decoding, stop_ids: list[int], pad_id: int, stop_criteria=None,
                         graphs: bool | None = None, check_every: int = 8):
    """Greedy replies to the left-padded prompts `ids` (`mask`), as `greedy_decode` writes them, from a static KV cache
    (transformers' StaticCache, prompt + decoding.max_new_tokens slots) and an explicit attention mask in which each
    step opens one slot. `graphs` (default: on CUDA) captures each side's decoding step (the adapter's, and with a
    base contrast the base's with the adapter off) as a CUDA graph and replays it; off, the same step runs eagerly
    (how the CPU tests check it). Whether every row has ended is read every `check_every` steps (a host sync)."""
    import torch
    from transformers import StaticCache

    rows, prompt = ids.shape
    total, device = prompt + decoding.max_new_tokens, ids.device
    graphs = device.type == "cuda" if graphs is None else graphs
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    blocked, cache_kw, beta = torch.finfo(dtype).min, cache_keyword(model), decoding.base_contrast
    open_keys = torch.zeros(rows, total, dtype=torch.bool, device=device)
    open_keys[:, :prompt] = mask.bool()
    allowed = open_keys[:, None, :] & torch.ones(prompt, total, dtype=torch.bool, device=device).tril()[None]
    allowed |= torch.eye(prompt, total, dtype=torch.bool, device=device)[None]  # a padding position sees itself: no NaN
    positions = _positions(mask, prompt)
    sides = [False, True] if beta else [False]  # True: the base (adapter switched off)

    def side(base: bool):
        return model.disable_adapter() if base else contextlib.nullcontext()

    caches, logits = {}, {}
    with torch.no_grad():
        for base in sides:
            caches[base] = StaticCache(config=model.config, max_cache_len=total)
            with side(base):
                out = model(input_ids=ids, attention_mask=torch.where(allowed, 0.0, blocked).to(dtype)[:, None],
                            position_ids=positions, cache_position=torch.arange(prompt, device=device), use_cache=True,
                            logits_to_keep=torch.tensor([prompt - 1], device=device), **{cache_kw: caches[base]})
            logits[base] = out.logits[:, -1].float()
    token = torch.full((rows, 1), pad_id, dtype=torch.long, device=device)
    step_positions = positions[:, -1:].clone()
    slot = torch.tensor([prompt - 1], device=device)
    step_mask = torch.where(open_keys, 0.0, blocked).to(dtype)[:, None, None, :].contiguous()

    def step(base: bool):
        with side(base):
            return model(input_ids=token, attention_mask=step_mask, position_ids=step_positions, cache_position=slot,
                         use_cache=True, **{cache_kw: caches[base]}).logits[:, -1]

    replays = {}
    if graphs:
        with torch.no_grad():
            step_positions.add_(1), slot.add_(1)
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up before capture, as torch.cuda.graph asks
                    for base in sides:
                        step(base), step(base)
                torch.cuda.current_stream().wait_stream(stream)
                for base in sides:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        captured = step(base)
                    replays[base] = (graph, captured)
            except torch.cuda.OutOfMemoryError:
                raise  # the caller's batch halving (evaluate.in_batches) handles it
            except RuntimeError as error:  # a step that cannot be captured: the same step, run eagerly
                if isinstance(error.__context__, torch.cuda.OutOfMemoryError) or "out of memory" in str(error):
                    raise  # an out-of-memory inside the capture ends it with another error: still memory
                print(f"Decoding: CUDA graph capture failed ({str(error).splitlines()[0][:200]}); decoding without graphs")
                replays, graphs = {}, False
            step_positions.sub_(1), slot.sub_(1)
            for base in sides:  # the static cache counts its own writes: warm-up and capture wrote past the prompt
                for layer in caches[base].layers:
                    layer.cumulative_length.fill_(prompt)

    score = _next_token_scorer(decoding, mask)
    every = torch.arange(rows, device=device)
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    seq, done = ids, torch.zeros(rows, dtype=torch.bool, device=device)
    out = torch.full((rows, decoding.max_new_tokens), pad_id, dtype=torch.long, device=device)
    with torch.no_grad():
        for t in range(decoding.max_new_tokens):
            scores = score(seq, logits[False], logits.get(True), every)
            chosen = torch.where(done, pad_id, scores.argmax(dim=-1))
            out[:, t] = chosen
            seq = torch.cat([seq, chosen[:, None]], dim=1)
            done |= torch.isin(chosen, stops)
            if stop_criteria is not None:
                done |= stop_criteria(seq, scores).to(device)
            if t + 1 == decoding.max_new_tokens or ((t + 1) % check_every == 0 and bool(done.all())):
                break
            token.copy_(chosen[:, None]), step_positions.add_(1), slot.add_(1)
            step_mask[:, :, :, prompt + t] = 0
            for base in sides:
                if graphs:
                    replays[base][0].replay()
                    logits[base] = replays[base][1].float()
                else:
                    logits[base] = step(base).float()
    return out
