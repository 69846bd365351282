"""The training task: retried once (resuming from the last checkpoint); CUDA out-of-memory backs off the layout."""
from __future__ import annotations

from pathlib import Path

from prefect.logging import get_run_logger

from personatune.config import from_mapping
from personatune.train import run_training
from tasks.caching import cached_stage
from tasks.progress import PrefectTrainingCallback


@cached_stage("train", retries=1, retry_delay_seconds=10)
def train_lora(out_dir: str, config: dict, base_model: str, model_fingerprint: str, init_adapter: str,
               tokenized_dir: str, callbacks: list | None = None) -> str:
    """Train the LoRA adapter: in this process, or one torchrun rank per GPU with their lines in this task's log.

    `callbacks`: more `TrainerCallback`s for the in-process path (a fault injector in tests); not in the cache key."""
    cfg = from_mapping(config)
    checkpoints = Path(out_dir).with_name(Path(out_dir).name + ".checkpoints")
    progress = PrefectTrainingCallback(description=f"LoRA r={cfg.lora_r} on {Path(base_model).name}")
    log = get_run_logger()
    return str(run_training(cfg, base_model, Path(init_adapter) / "adapter", tokenized_dir, out_dir, checkpoints,
                            callbacks=[progress, *(callbacks or [])], log=log.info, warn=log.warning))
