"""How replies are decoded, once for everyone: evaluation, `flows.chat`, the bundle's generation_config.json.

Greedy decoding of a small tuned model falls into loops ("I'll tell you what to say. I'll tell you what to say.
..."). The repetition controls below were chosen by measurement on the unseen-topic probes (QUALITY.md,
"Decoding"); they are deterministic, so two evaluations of the same adapter still give the same replies.
The values travel with every adapter as `generation_config.json`, so a consumer that loads the bundle (or the
Hub repo) decodes exactly as the evaluation measured.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from personatune.prompt import STOP_STRINGS

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 64
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def from_config(cls, cfg) -> "Decoding":
        return cls(cfg.max_new_tokens, cfg.repetition_penalty, cfg.no_repeat_ngram_size)

    def generate_kwargs(self) -> dict:
        """The repetition controls in `model.generate()` keywords (only those that are switched on)."""
        kwargs: dict = {}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size > 0:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)


def generation_config(tok, decoding: Decoding):
    """A `transformers.GenerationConfig`: greedy, EOS = pad = the tokenizer's EOS, the `###` stop string, and the
    repetition controls; `save_pretrained(folder)` writes generation_config.json."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=decoding.max_new_tokens, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, stop_strings=list(STOP_STRINGS),
                            **decoding.generate_kwargs())


def load_decoding(folder: str | Path, default: Decoding | None = None) -> Decoding:
    """The decoding settings stored with an adapter (generation_config.json), else `default` (the config's)."""
    path = Path(folder) / GENERATION_CONFIG
    default = default or Decoding()
    if not path.is_file():
        return default
    data = json.loads(path.read_text())
    return Decoding(int(data.get("max_new_tokens", default.max_new_tokens)),
                    float(data.get("repetition_penalty", 1.0)), int(data.get("no_repeat_ngram_size", 0)))
