"""Evaluation tasks: each model scored once on the fixed sets (cached by content), then the three-way report."""
from __future__ import annotations

from pathlib import Path

from personatune.config import from_mapping
from personatune.evaluate import EvaluationModels, evaluate_adapter, score_adapter
from personatune.files import sha256_file
from tasks.caching import cached_stage


@cached_stage("score")
def score_model(out_dir: str, config: dict, base_model: str, model_fingerprint: str, adapter_sha256: str,
                eval_sha256: dict, adapter_dir: str | None = None, models: EvaluationModels | None = None) -> str:
    """Golden loss, replies, persona similarity and loop/run-on rates of the base (no adapter) or one adapter.

    The key is the adapter's content, not its folder: the champion's scores, computed when it was a challenger,
    are a cache hit, and the base is scored once per base model and evaluation set."""
    return str(score_adapter(from_mapping(config), base_model, adapter_dir, out_dir, models))


def adapter_sha256(adapter_dir: str | Path | None) -> str:
    """The adapter's content: its weights and its config (rank, alpha and targets change what it computes)."""
    if not adapter_dir:
        return "base"
    return "-".join(sha256_file(Path(adapter_dir) / f)[:32] for f in ("adapter_model.safetensors", "adapter_config.json"))


@cached_stage("evaluate")
def evaluate_lora(out_dir: str, config: dict, base_model: str, model_fingerprint: str, adapter_dir: str,
                  tokenized_dir: str, scores: dict, champion_dir: str | None, models: EvaluationModels | None = None) -> str:
    """Base, champion and challenger side by side: eval.json, report.md, plot, generation_config.json."""
    cfg = from_mapping(config)
    return str(evaluate_adapter(cfg, base_model, adapter_dir, tokenized_dir, scores, out_dir,
                                champion_dir=champion_dir, models=models))
