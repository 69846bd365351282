"""One rank of data-parallel training; started by torchrun through `personatune.distributed.train_distributed`,
or by hand:

    torchrun --standalone --nproc-per-node 2 -m personatune.train_rank spec.json

`spec.json` holds `config` (a FinetuneConfig mapping), `plan` (the TrainPlan the caller made once) and the folders
of `train_adapter`. Each rank pins its GPU (LOCAL_RANK) and its memory cap before the 4-bit base is loaded
(`load_qlora_model` puts it on the current device), the HF Trainer then runs DDP from the torchrun environment.
Rank 0 writes the adapter; the other ranks train into a scratch folder that is removed. A CUDA out-of-memory error
ends the rank with `EXIT_OUT_OF_MEMORY`, so the launcher's caller can relaunch smaller. Plain Python: no Prefect.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def setup_rank() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; pins this process to its GPU."""
    import torch

    from personatune.speedups import enforce_memory_cap

    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        enforce_memory_cap(local)
    return rank, world


def rank_config(cfg, world_size: int):
    """The config a rank trains with. `train_adapter` sizes the warmup from the one-GPU step count; with N ranks
    an epoch has 1/N of the optimizer steps, so the warmup share is divided by N to stay `warmup_ratio` of the
    steps taken. With `max_steps` the step count is the same on any number of GPUs: unchanged."""
    if world_size > 1 and cfg.max_steps < 0 and cfg.warmup_ratio:
        return cfg.replace(warmup_ratio=cfg.warmup_ratio / world_size)
    return cfg


def _callbacks(rank: int, world: int):
    from transformers import TrainerCallback

    class AfterTraining(TrainerCallback):
        """Barrier at the end of training: rank 0 has finished writing its last checkpoint before any rank leaves
        `trainer.train()` (and removes the shared checkpoint folder)."""

        def on_train_end(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()

    class StepLines(TrainerCallback):
        """One line a logged step on rank 0 (the ranks' progress bars are off): streamed by the launcher."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                      f"lr {logs.get('learning_rate', 0):.3g} ({world} GPUs)", flush=True)

    return [AfterTraining()] + ([StepLines()] if rank == 0 else [])


def train_on_rank(cfg, plan, resolved, init_adapter, tokenized_dir, adapter_dir, checkpoints_dir=None, *,
                  callbacks=None, rank_adapter_dir=None, **train_kwargs) -> Path:
    """`train_adapter` as one rank of a DDP run (same arguments). Ranks other than 0 write their adapter to
    `rank_adapter_dir` (default: a temporary folder, removed afterwards); `train_kwargs` go to `train_adapter`."""
    from personatune.distributed import COLLECTIVE_TIMEOUT_S
    from personatune.train import train_adapter

    rank, world = setup_rank()
    cfg = rank_config(cfg, world)
    adapter_dir = Path(adapter_dir)
    if checkpoints_dir is None:  # every rank must resume from the same checkpoints
        checkpoints_dir = adapter_dir.with_name(adapter_dir.name + ".checkpoints")
    scratch = None
    if rank != 0:
        if rank_adapter_dir is None:
            scratch = Path(tempfile.mkdtemp(prefix=f"personatune-rank{rank}-"))
        adapter_dir = Path(rank_adapter_dir) if rank_adapter_dir is not None else scratch / "adapter"
    arguments = {"ddp_timeout": COLLECTIVE_TIMEOUT_S, **train_kwargs.pop("arguments", {})}
    try:
        return train_adapter(cfg, plan, resolved, init_adapter, tokenized_dir, adapter_dir, checkpoints_dir,
                             callbacks=list(callbacks or []) + _callbacks(rank, world), arguments=arguments,
                             **train_kwargs)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # leave cleanly: no TCPStore errors when rank 0 exits
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m personatune.train_rank SPEC.json (under torchrun)", file=sys.stderr)
        return 2
    import torch

    from personatune.config import from_mapping
    from personatune.distributed import EXIT_OUT_OF_MEMORY
    from personatune.plan import TrainPlan

    spec = json.loads(Path(argv[0]).read_text())
    try:
        train_on_rank(from_mapping(spec["config"]), TrainPlan(**spec["plan"]), spec["resolved"], spec["init_adapter"],
                      spec["tokenized_dir"], spec["adapter_dir"], spec["checkpoints_dir"])
    except torch.cuda.OutOfMemoryError as oom:
        print(f"CUDA out of memory on rank {os.environ.get('RANK', 0)}: {str(oom).splitlines()[0]}", file=sys.stderr,
              flush=True)
        return EXIT_OUT_OF_MEMORY
    return 0


if __name__ == "__main__":
    sys.exit(main())
