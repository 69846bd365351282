"""DDP variants measured for the multi-GPU path and not adopted (BENCHMARKS.md, "Multi-GPU": none beat the
run-to-run spread). They reach the recipe through its public seams only: TrainingArguments fields
(`train_adapter(..., arguments=...)`) and a Trainer subclass (`train_adapter(..., trainer_class=...)`);
`bench/multi_gpu.py sweep` runs them.
"""
from __future__ import annotations

# variant settings: what each can switch (all off is what the recipe does)
SETTINGS = ("static_graph", "gradient_as_bucket_view", "balance_tokens", "non_blocking")


def arguments(settings: dict) -> dict:
    """TrainingArguments fields for `settings`: DDP static_graph (every LoRA parameter is used in every step);
    `non_blocking`: accelerate copies each batch to the GPU without waiting for it (pinned memory), so the host does
    not block at the start of a step until the GPU has finished the previous one (its all-reduce included)."""
    out: dict = {"ddp_static_graph": True} if settings.get("static_graph") else {}
    if settings.get("non_blocking"):
        out["accelerator_config"] = {"non_blocking": True}
    return out


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


def trainer_class(settings: dict):
    """A Trainer subclass for `settings`: token-balanced sampler (`balance_tokens`), gradients that alias DDP's
    all-reduce buckets (`gradient_as_bucket_view`). None when neither is on."""
    if not (settings.get("balance_tokens") or settings.get("gradient_as_bucket_view")):
        return None
    import torch
    from transformers import Trainer

    class VariantTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if settings.get("gradient_as_bucket_view") and self.accelerator.ddp_handler is not None:
                self.accelerator.ddp_handler.gradient_as_bucket_view = True

        def _get_train_sampler(self, train_dataset=None):
            from accelerate.data_loader import SeedableRandomSampler

            inner = super()._get_train_sampler(train_dataset)
            ds = self.train_dataset if train_dataset is None else train_dataset
            if (not settings.get("balance_tokens") or inner is None or self.args.world_size < 2
                    or "input_ids" not in getattr(ds, "column_names", ())):
                return inner
            if type(inner) is torch.utils.data.RandomSampler:  # what accelerate itself would turn it into, so that
                config = getattr(self.accelerator, "dataloader_config", None)  # every rank draws the same order
                inner = SeedableRandomSampler(data_source=inner.data_source, replacement=inner.replacement,
                                              num_samples=inner._num_samples, generator=inner.generator,
                                              data_seed=getattr(config, "data_seed", None))
            return BalancedSampler(inner, [len(x) for x in ds["input_ids"]], self.args.per_device_train_batch_size,
                                   self.args.gradient_accumulation_steps, self.args.world_size)

    return VariantTrainer
