"""Validation and tokenization tasks."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from personatune.config import DATA_FIELDS, from_mapping
from personatune.data import build_dataset
from personatune.files import sha256_file
from personatune.sources import data_cache, fetch, is_remote
from personatune.tokenization import load_tokenizer, tokenize_dataset
from tasks.caching import cached_stage


@task(name="fetch_data")
def fetch_data(config: dict) -> dict[str, dict]:
    """{field: {path, sha256, source}} for quotes_csv, golden_csv and probes_csv. A URL (hf://, s3://, ...) is
    downloaded once per content into `<output_dir>/.cache/data/` (personatune.sources); a local path is read
    in place (sha256 "missing" for an empty or absent optional file)."""
    from tasks.publish import hub_token

    log = get_run_logger()
    out = {}
    for name in DATA_FIELDS:
        value = config[name]
        if not is_remote(value):
            out[name] = {"path": value, "source": None,
                         "sha256": sha256_file(value) if value and Path(value).is_file() else "missing"}
            continue
        token = hub_token()[0] if value.startswith("hf://") else None
        got = fetch(value, data_cache(config["output_dir"]), token)
        log.info("%s: %s %s (revision %s, sha256 %s)", name, value, "cached" if got["cached"] else "downloaded",
                 got["source"]["revision"] or "-", got["sha256"][:12])
        out[name] = got
    return out


@cached_stage("validate")
def validate_quotes(out_dir: str, config: dict, quotes_csv: str, csv_sha256: str) -> str:
    """Validate the CSV (errors name file, line, column; a remote CSV's errors name its URL) and save the
    train/eval split as Arrow. `quotes_csv` is the local copy; its content is keyed by `csv_sha256`."""
    cfg = from_mapping(config)
    return str(build_dataset(quotes_csv, cfg.eval_fraction, out_dir, name=cfg.quotes_csv))


@cached_stage("tokenize")
def tokenize_quotes(out_dir: str, config: dict, dataset_dir: str, base_model: str, model_fingerprint: str) -> str:
    """Render the prompt format and tokenize with response-only labels (datasets.map, Arrow on disk)."""
    cfg = from_mapping(config)
    tok = load_tokenizer(base_model, cfg.base_revision)
    return str(tokenize_dataset(dataset_dir, tok, cfg.max_seq_len, cfg.on_long_row, out_dir, quotes_csv=cfg.quotes_csv,
                                prompt_format=cfg.prompt_format))
