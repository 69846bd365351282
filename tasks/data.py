"""Validation and tokenization tasks."""
from __future__ import annotations

from personatune.config import from_mapping
from personatune.data import build_dataset
from personatune.tokenization import load_tokenizer, tokenize_dataset
from tasks.caching import cached_stage


@cached_stage("validate")
def validate_quotes(out_dir: str, config: dict, quotes_csv: str, csv_sha256: str) -> str:
    """Validate the CSV (errors name file, line, column) and save the train/eval split as Arrow."""
    cfg = from_mapping(config)
    return str(build_dataset(quotes_csv, cfg.eval_fraction, out_dir))


@cached_stage("tokenize")
def tokenize_quotes(out_dir: str, config: dict, dataset_dir: str, base_model: str, model_fingerprint: str) -> str:
    """Render the prompt format and tokenize with response-only labels (datasets.map, Arrow on disk)."""
    cfg = from_mapping(config)
    tok = load_tokenizer(base_model, cfg.base_revision)
    return str(tokenize_dataset(dataset_dir, tok, cfg.max_seq_len, cfg.on_long_row, out_dir, quotes_csv=cfg.quotes_csv,
                                prompt_format=cfg.prompt_format))
