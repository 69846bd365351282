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
    settings = dict(DDP_SETTINGS)
    train.training_arguments = lambda *a, **k: ddp_arguments(real_arguments(*a, **k), settings)
    try:
        with _patched_trainer(settings):
            return (_train or train.train_adapter)(cfg, resolved, init_adapter, tokenized_dir, adapter_dir,
                                                   checkpoints_dir, callbacks=list(callbacks or []) + _callbacks(rank, world),
                                                   **kwargs)
    finally:
        train.training_arguments = real_arguments
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # leave cleanly: no TCPStore errors when rank 0 exits
            dist.destroy_process_group()


# DDP settings of every multi-GPU run (the measured defaults: BENCHMARKS.md, "Multi-GPU"). `bench/multi_gpu.py`
# overrides them per variant in its rank processes to measure each one.
DDP_SETTINGS = {
    "logging_steps": 1,               # Trainer logging: a cross-rank loss gather + host syncs each logged step
    "static_graph": False,            # DDP static_graph (every LoRA parameter is used in every step)
    "gradient_as_bucket_view": False,  # gradients alias DDP's all-reduce buckets (no copy)
    "balance_tokens": False,          # reorder each optimizer step's examples so the ranks get similar token counts
}


def ddp_arguments(args, settings: dict | None = None):
    """DDP settings for a LoRA run: every trainable (LoRA) parameter gets a gradient in every step, so DDP need not
    search the graph for unused ones each step; the model's buffers (rotary tables) are the same on every rank,
    so they need no broadcast before each forward. Plus `DDP_SETTINGS`."""
    settings = {**DDP_SETTINGS, **(settings or {})}
    args.ddp_find_unused_parameters = False
    args.ddp_broadcast_buffers = False
    args.logging_steps = settings["logging_steps"]
    if settings["static_graph"]:
        args.ddp_static_graph = True
    return args


def balance_chunk(indices: list[int], lengths, micro: int, bins: int) -> list[int]:
    """The same examples, laid out as `bins` consecutive micro-batches of `micro` with similar token counts
    (longest first, each into the lightest micro-batch that has room). A short (last) chunk is left as it is."""
    if len(indices) != micro * bins or bins < 2:
        return list(indices)
    groups: list[list[int]] = [[] for _ in range(bins)]
    tokens = [0] * bins
    for i in sorted(indices, key=lambda i: -lengths[i]):
        b = min((b for b in range(bins) if len(groups[b]) < micro), key=lambda b: tokens[b])
        groups[b].append(i)
        tokens[b] += lengths[i]
    return [i for g in groups for i in g]


class BalancedSampler:
    """Wraps the Trainer's sampler. Accelerate hands the per-device batches round robin to the ranks, so optimizer
    step k takes the `world x micro x accum` consecutive indices [k*chunk, (k+1)*chunk): reordering within that chunk
    keeps each step's set of examples and only changes which rank (and micro-batch) gets which example."""

    def __init__(self, inner, lengths, micro: int, accum: int, world: int):
        self.inner, self.lengths, self.micro, self.bins = inner, lengths, micro, accum * world

    @property
    def generator(self):  # accelerate synchronizes the shuffling generator of the ranks through this
        return getattr(self.inner, "generator", None)

    @generator.setter
    def generator(self, value):
        self.inner.generator = value

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        order, chunk = list(self.inner), self.micro * self.bins
        for s in range(0, len(order), chunk):
            yield from balance_chunk(order[s:s + chunk], self.lengths, self.micro, self.bins)


def _patched_trainer(settings: dict):
    """Context: the Trainer class as a rank needs it for `settings` (token-balanced sampler, bucket-view DDP)."""
    import contextlib

    import transformers.trainer as hf

    @contextlib.contextmanager
    def patched():
        real_sampler, real_kwargs = hf.Trainer._get_train_sampler, hf.DistributedDataParallelKwargs

        def sampler(self, train_dataset=None):
            import torch
            from accelerate.data_loader import SeedableRandomSampler

            inner = real_sampler(self, train_dataset)
            ds = self.train_dataset if train_dataset is None else train_dataset
            if inner is None or self.args.world_size < 2 or "input_ids" not in getattr(ds, "column_names", ()):
                return inner
            if type(inner) is torch.utils.data.RandomSampler:  # what accelerate itself would turn it into, so that
                config = getattr(self.accelerator, "dataloader_config", None)  # every rank draws the same order
                inner = SeedableRandomSampler(data_source=inner.data_source, replacement=inner.replacement,
                                              num_samples=inner._num_samples, generator=inner.generator,
                                              data_seed=getattr(config, "data_seed", None))
            return BalancedSampler(inner, [len(x) for x in ds["input_ids"]], self.args.per_device_train_batch_size,
                                   self.args.gradient_accumulation_steps, self.args.world_size)

        if settings["balance_tokens"]:
            hf.Trainer._get_train_sampler = sampler
        if settings["gradient_as_bucket_view"]:
            hf.DistributedDataParallelKwargs = lambda **k: real_kwargs(**{"gradient_as_bucket_view": True, **k})
        try:
            yield
        finally:
            hf.Trainer._get_train_sampler, hf.DistributedDataParallelKwargs = real_sampler, real_kwargs

    return patched()


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
