"""The adapter bundle: everything a user or the Hub needs, in `outputs/<run>/`, written all at once.

`outputs/latest` is a symlink swapped atomically (rename over it), so it only ever names a complete bundle.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from pathlib import Path

from personatune.config import FinetuneConfig
from personatune.files import COMPLETE_MARKER, atomic_dir, is_complete

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "history.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "added_tokens.json")


def default_run_name(data_hash: str) -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + f"-{data_hash[:8]}"


def write_bundle(cfg: FinetuneConfig, run_name: str, adapter_dir: str | Path, eval_dir: str | Path,
                 provenance: dict) -> Path:
    """Copy adapter, tokenizer, eval and the resolved config into outputs/<run_name>/; point latest at it."""
    outputs = Path(cfg.output_dir)
    run_dir = outputs / run_name
    if is_complete(run_dir):
        raise FileExistsError(f"{run_dir} already holds a bundle; choose another run_name")
    with atomic_dir(run_dir) as tmp:
        for name in (*ADAPTER_FILES, *TOKENIZER_FILES):
            if (Path(adapter_dir) / name).is_file():
                shutil.copy2(Path(adapter_dir) / name, tmp / name)
        for name in ("eval.json", "report.md"):
            shutil.copy2(Path(eval_dir) / name, tmp / name)
        for extra in Path(eval_dir).glob("*.png"):
            shutil.copy2(extra, tmp / extra.name)
        (tmp / "training_config.json").write_text(
            json.dumps({"config": cfg.to_dict(), **provenance}, indent=2, sort_keys=True) + "\n")
    point_latest(outputs, run_name)
    return run_dir


def point_latest(outputs: Path, run_name: str) -> None:
    link = outputs / "latest"
    tmp = outputs / f".latest-{uuid.uuid4().hex[:8]}"
    os.symlink(run_name, tmp)
    os.replace(tmp, link)


def latest_bundle(outputs: str | Path = "outputs") -> Path:
    link = Path(outputs) / "latest"
    if not link.exists() or not (link / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"no complete bundle at {link}; run `python -m flows.finetune` first")
    return link.resolve()
