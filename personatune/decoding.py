"""How replies are decoded, once for everyone: evaluation, `flows.chat`, the bundle's generation_config.json.

Greedy decoding of a small tuned model falls into loops ("I'll tell you what to say. I'll tell you what to say.
..."). The repetition controls below were chosen by measurement on the unseen-topic probes (QUALITY.md,
"Decoding"); sampling (temperature > 0) is measured there too and off by default. Sampling is seeded per
generation batch (`seed`), so two evaluations of the same adapter on the same machine still give the same replies.
The values travel with every adapter as `generation_config.json`, so a consumer that loads the bundle (or the
Hub repo) decodes exactly as the evaluation measured.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from personatune.prompt import stop_strings

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 64
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass when sampling

    @classmethod
    def from_config(cls, cfg) -> "Decoding":
        return cls(cfg.max_new_tokens, cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.temperature, cfg.top_p)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def describe(self) -> str:
        how = f"sampled (temperature {self.temperature}, top-p {self.top_p}, seeded)" if self.sampling else "greedy"
        return (f"{how}, repetition penalty {self.repetition_penalty}, no-repeat n-gram size "
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
    return GenerationConfig(max_new_tokens=decoding.max_new_tokens, eos_token_id=generation_eos(tok, prompt_format),
                            pad_token_id=tok.pad_token_id, **stops, **decoding.generate_kwargs())


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
                    float(data.get("top_p", 1.0)) if sampling else 1.0)
