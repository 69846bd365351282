"""The training task: retried once (resuming from the last epoch checkpoint); CUDA OOM halves the micro-batch."""
from __future__ import annotations

from pathlib import Path

from personatune.config import from_mapping
from personatune.distributed import gpus_for, train_distributed
from prefect.logging import get_run_logger

from personatune.train import train_with_oom_backoff
from tasks.caching import cached_stage
from tasks.progress import PrefectTrainingCallback


@cached_stage("train", retries=1, retry_delay_seconds=10)
def train_lora(out_dir: str, config: dict, base_model: str, model_fingerprint: str, init_adapter: str,
               tokenized_dir: str, callbacks: list | None = None) -> str:
    """Train the LoRA adapter with the HF Trainer (paged_adamw_8bit, grad accumulation, dynamic padding).

    `callbacks`: more `TrainerCallback`s for the one-process path (a fault injector in tests); not in the cache key."""
    cfg = from_mapping(config)
    checkpoints = Path(out_dir).with_name(Path(out_dir).name + ".checkpoints")
    if (gpus := gpus_for(cfg)) > 1:  # data-parallel: one rank per GPU, supervised, their lines in this task's log
        from prefect.logging import get_run_logger as run_logger

        return str(train_distributed(cfg, base_model, Path(init_adapter) / "adapter", tokenized_dir, out_dir,
                                     checkpoints, num_gpus=gpus, log=run_logger().info))
    progress = PrefectTrainingCallback(description=f"LoRA r={cfg.lora_r} on {Path(base_model).name}")
    return str(train_with_oom_backoff(cfg, base_model, Path(init_adapter) / "adapter", tokenized_dir, out_dir,
                                      checkpoints, callbacks=[progress, *(callbacks or [])],
                                      log=get_run_logger().warning))
