"""One rank of data-parallel training; started by `personatune.distributed.train_distributed`, or by hand:

    torchrun --standalone --nproc-per-node 2 -m personatune.train_rank spec.json

`spec.json` holds `config` (a FinetuneConfig mapping) and the folders of `train_adapter`. Each rank pins its GPU
(LOCAL_RANK) before the 4-bit base is loaded (`load_qlora_model` puts it on the current device), the HF Trainer
then runs DDP from the torchrun environment. Rank 0 writes the adapter; the other ranks train into a scratch
folder that is removed. Plain Python: no Prefect here.
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

    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
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


def train_on_rank(cfg, resolved, init_adapter, tokenized_dir, adapter_dir, checkpoints_dir=None, callbacks=None,
                  _train=None, **kwargs) -> Path:
    """`train_adapter` as one rank of a DDP run (same arguments)."""
    from personatune import train

    rank, world = setup_rank()
    cfg = rank_config(cfg, world)
    adapter_dir = Path(adapter_dir)
    if checkpoints_dir is None:  # every rank must resume from the same checkpoints
        checkpoints_dir = adapter_dir.with_name(adapter_dir.name + ".checkpoints")
    scratch = None
    if rank != 0:
        scratch = Path(tempfile.mkdtemp(prefix=f"personatune-rank{rank}-"))
        adapter_dir = scratch / "adapter"
    real_arguments = train.training_arguments
    train.training_arguments = lambda *a, **k: ddp_arguments(real_arguments(*a, **k))
    try:
        return (_train or train.train_adapter)(cfg, resolved, init_adapter, tokenized_dir, adapter_dir, checkpoints_dir,
                                               callbacks=list(callbacks or []) + _callbacks(rank, world), **kwargs)
    finally:
        train.training_arguments = real_arguments
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # leave cleanly: no TCPStore errors when rank 0 exits
            dist.destroy_process_group()


def ddp_arguments(args):
    """DDP settings for a LoRA run: every trainable (LoRA) parameter gets a gradient in every step, so DDP need not
    search the graph for unused ones each step; the model's buffers (rotary tables) are the same on every rank,
    so they need no broadcast before each forward."""
    args.ddp_find_unused_parameters = False
    args.ddp_broadcast_buffers = False
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m personatune.train_rank SPEC.json (under personatune.distributed or torchrun)", file=sys.stderr)
        return 2
    from personatune.config import from_mapping

    spec = json.loads(Path(argv[0]).read_text())
    train_on_rank(from_mapping(spec["config"]), spec["resolved"], spec["init_adapter"], spec["tokenized_dir"],
                  spec["adapter_dir"], spec["checkpoints_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
