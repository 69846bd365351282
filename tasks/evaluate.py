"""Evaluation task: base vs tuned losses and sample replies (eval.json, report.md)."""
from __future__ import annotations

from personatune.config import from_mapping
from personatune.evaluate import evaluate_adapter
from tasks.caching import cached_stage


@cached_stage("evaluate")
def evaluate_lora(out_dir: str, config: dict, base_model: str, model_fingerprint: str, adapter_dir: str,
                  tokenized_dir: str, dataset_dir: str) -> str:
    """Held-out loss of base and tuned model, greedy replies that stop at the end of the response."""
    cfg = from_mapping(config)
    return str(evaluate_adapter(cfg, base_model, adapter_dir, tokenized_dir, dataset_dir, out_dir))
