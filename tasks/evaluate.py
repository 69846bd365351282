"""Evaluation task: base vs tuned losses, persona metrics and sample replies (eval.json, report.md, plot)."""
from __future__ import annotations

from personatune.config import from_mapping
from personatune.evaluate import evaluate_adapter
from tasks.caching import cached_stage


@cached_stage("evaluate")
def evaluate_lora(out_dir: str, config: dict, base_model: str, model_fingerprint: str, adapter_dir: str,
                  tokenized_dir: str, dataset_dir: str, probes_sha256: str) -> str:
    """Held-out loss, persona similarity, run-on rate and replies of base vs tuned; report and plot."""
    cfg = from_mapping(config)
    return str(evaluate_adapter(cfg, base_model, adapter_dir, tokenized_dir, dataset_dir, out_dir))
