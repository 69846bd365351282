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

import functools
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
    import inspect

    import torch
    from transformers import DynamicCache, LogitsProcessor, RepetitionPenaltyLogitsProcessor

    beta = decoding.base_contrast
    # as this transformers' generate() builds its own repetition penalty: newer ones leave the left padding (EOS) out
    # (prompt_ignore_length = the padding lengths), older ones penalize it with the prompt
    if penalize_padding is None:
        penalize_padding = not generate_ignores_left_padding()
    ignore = None if penalize_padding else (attention_mask != 0).int().argmax(dim=1)

    def penalized(input_ids, logits, rows):
        if decoding.repetition_penalty == 1.0:
            return logits
        extra = {} if ignore is None else {"prompt_ignore_length": ignore[rows]}
        return RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty, **extra)(input_ids, logits)

    # transformers renamed the cache keyword (past_key_values -> cache) within the supported range
    cache_kw = "cache" if "cache" in inspect.signature(model.get_base_model().forward).parameters else "past_key_values"
    floor = math.log(plausibility)
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
            positions = (self.mask.cumsum(1) - 1).clamp(min=0)[:, -new.shape[1]:]
            with model.disable_adapter():
                out = model(input_ids=new[self.rows], attention_mask=self.mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{cache_kw: self.cache})  # the prompt's last position only
            base = torch.log_softmax(penalized(input_ids[self.rows], out.logits[:, -1].float(), self.rows), dim=-1)
            tuned = torch.log_softmax(scores[self.rows].float(), dim=-1)
            plausible = tuned >= tuned.max(dim=-1, keepdim=True).values + floor
            contrast = (1 + beta) * tuned - beta * base
            result = scores.clone()
            result[self.rows] = torch.where(plausible, contrast, torch.full_like(contrast, -math.inf)).to(scores.dtype)
            return result

    return BaseContrast()
