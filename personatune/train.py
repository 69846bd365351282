"""Train the LoRA adapters with the Hugging Face Trainer: one recipe, read top to bottom.

The caller plans the run once (`plan_for_run`: a pure `personatune.plan.TrainPlan`); `train_adapter(cfg, plan, ...)`
then loads the model, applies the plan's speed-ups (`personatune.speedups.apply_plan`), builds the Trainer and saves.
Everything a caller may change comes in as a parameter (plan, callbacks, data collator, Trainer class, extra
TrainingArguments): the flow, the ranks of a multi-GPU run and the benchmarks call the same function.
`run_training` is what the flow's task runs: in this process, or one rank per GPU under torchrun, with the
out-of-memory back-off around either (`train_with_oom_backoff`).

Checkpoints are written every epoch into `checkpoints_dir`; calling `train_adapter` again with the same
folders (a retried task, a re-run after a crash) resumes from the last one instead of starting over.
The finished adapter appears atomically in `adapter_dir`; the checkpoints are removed once it exists.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from personatune.config import FinetuneConfig
from personatune.files import atomic_dir, is_complete
from personatune.model import compute_dtype, load_qlora_model
from personatune.prompt import bundle_chat_template
from personatune.tokenization import IGNORE_INDEX, load_tokenized, load_tokenizer

logger = logging.getLogger(__name__)


def collator(tok, packing: bool = False, varlen: bool = False):
    """Dynamic padding (pad each batch to its longest example, padded labels -100), or padding-free packing.

    Packing concatenates the micro-batch into one row with position ids restarting at 0 for each example and
    no attention mask; the attention kernels then keep examples apart (the loss equals the padded batch's, see
    tests/test_packing.py). The first label of each example is -100 (it would be predicted from the previous
    example); ours is a prompt token, masked anyway. `varlen` adds the example boundaries (`cu_seq_lens_*`,
    `max_length_*`) for the varlen flash attention of the GPU profiles (personatune/plan.py, personatune/speedups.py).
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                          return_flash_attn_kwargs=varlen)
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def training_arguments(cfg: FinetuneConfig, output_dir: Path, train_rows: int, plan=None, held_out: bool = False,
                       **overrides):
    """TrainingArguments of the recipe. With a GPU profile's `plan`, checkpointing is set per layer on the model
    (speedups.apply_plan), so the Trainer must not switch it on for every layer again. `overrides`: more
    TrainingArguments fields (a rank's collective timeout, a benchmark's DDP variant).

    The same logging interval (the plan's) on one GPU and on each rank of a multi-GPU run: every log reads the loss
    back from the GPU and, under DDP, gathers it across ranks. Under DDP every trainable (LoRA) parameter gets a
    gradient in every step, so DDP need not search the graph for unused ones, and the buffers (rotary tables) are
    the same on every rank, so they need no broadcast before each forward; one process ignores both.

    With `held_out` rows the held-out loss is measured every `eval_every_steps` (or once an epoch) and at the last
    step, a checkpoint is saved at each measurement, and the best one (lowest held-out loss) is what training
    returns: a last epoch that overfits does not replace a better earlier one. When that is one measurement, at the
    last step (the default: one epoch), there is nothing to choose and the Trainer does not measure: the evaluation
    stage measures the finished adapter's held-out loss anyway (on a 2-core CPU that saves ~17 s of the default run)."""
    from transformers import TrainingArguments

    dtype = compute_dtype(cfg.compute_dtype)
    steps_per_epoch = math.ceil(train_rows / (cfg.micro_batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    every = cfg.eval_every_steps or max(1, steps_per_epoch)
    # the Trainer measures at every `every`-th step and at the last: one measurement leaves nothing to choose
    held_out = held_out and math.ceil(total_steps / every) > 1
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(cfg.warmup_ratio * total_steps),
        optim=cfg.optim,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16 and torch.cuda.is_available(),
        gradient_checkpointing=cfg.gradient_checkpointing and (plan is None or plan.profile in ("manual", "cpu")),
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,  # with load_best_model_at_end the Trainer keeps the best one besides the newest
        eval_strategy="steps" if held_out else "no",
        eval_steps=every,
        per_device_eval_batch_size=cfg.micro_batch_size,
        load_best_model_at_end=held_out,
        metric_for_best_model="eval_loss" if held_out else None,
        greater_is_better=False if held_out else None,
        neftune_noise_alpha=cfg.neftune_noise_alpha or None,
        logging_steps=plan.logging_steps if plan is not None else 1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # its NaN/inf check reads every micro-batch's loss back: a host sync on a GPU (a NaN then shows in the log)
        logging_nan_inf_filter=not torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,
        **overrides,
    )


class StepLosses:
    """The training loss of every optimizer step, without reading it back from the GPU every step.

    The Trainer reads the loss back (a host-GPU sync) only when it logs; under a GPU plan that logs every
    `logging_steps`, this keeps each step's loss tensor (the sum of its micro-batches' losses, which is what the
    Trainer logs for one step) and reads them all back in one go when the Trainer logs and at the end.
    """

    def __init__(self):
        self.pending: list = []          # micro-batch losses of the step in progress (device tensors)
        self.steps: list[tuple] = []     # (step, epoch, lr, loss tensor or float)

    def trainer_class(self, base=None):
        from transformers import Trainer

        recorder = self

        class RecordingTrainer(base or Trainer):
            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                recorder.pending.append(loss.detach())
                return loss

        return RecordingTrainer

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class Close(TrainerCallback):
            def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
                if recorder.pending:
                    loss = recorder.pending[0] if len(recorder.pending) == 1 else torch.stack(recorder.pending).sum()
                    scheduler = lr_scheduler
                    lr = scheduler.get_last_lr()[0] if scheduler is not None else None
                    recorder.steps.append((state.global_step, state.epoch, lr, loss))
                    recorder.pending = []

            def on_log(self, args, state, control, **kwargs):
                recorder.read_back()

        return Close()

    def read_back(self) -> None:
        idx = [i for i, s in enumerate(self.steps) if torch.is_tensor(s[3])]
        if idx:
            values = torch.stack([self.steps[i][3].float() for i in idx]).tolist()
            for i, v in zip(idx, values):
                self.steps[i] = (*self.steps[i][:3], v)

    def history(self, logged: list[dict]) -> list[dict]:
        """Per-step entries; steps before the first recorded one (a run resumed from a checkpoint) come from the
        Trainer's own log, restored with the checkpoint."""
        self.read_back()
        first = self.steps[0][0] if self.steps else float("inf")
        earlier = [e for e in logged if e["step"] < first]
        return earlier + [{"step": step, "epoch": epoch, "loss": round(loss, 6), "learning_rate": lr}
                          for step, epoch, lr, loss in self.steps]


def last_checkpoint(checkpoints: Path) -> str | None:
    """The newest *complete* checkpoint. The Trainer writes checkpoint-N in place and `trainer_state.json`
    after the weights, so a process killed mid-save leaves a folder without it: skip (and remove) such a folder
    rather than resume from half a checkpoint."""
    import re
    import shutil

    if not checkpoints.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in checkpoints.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file() and (path / "adapter_model.safetensors").is_file():
            return str(path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def plan_for_run(cfg: FinetuneConfig, resolved: str, tokenized_dir: str | Path, cuda: bool | None = None,
                 min_compile_steps: int | None = None):
    """The run's layout (personatune.plan.plan_training) from the model's shape and the training examples' lengths.
    `min_compile_steps`: see plan_training (None: its default)."""
    from personatune.plan import COMPILE_MIN_STEPS, ModelShape, plan_training

    cuda = torch.cuda.is_available() if cuda is None else cuda
    lengths = [len(x) for x in load_tokenized(tokenized_dir)["train"]["input_ids"]]
    shape = ModelShape.from_pretrained(resolved, cfg.base_revision) if cuda else None
    return plan_training(cfg, shape, lengths, cuda=cuda,
                         min_compile_steps=COMPILE_MIN_STEPS if min_compile_steps is None else min_compile_steps)


def train_adapter(cfg: FinetuneConfig, plan, resolved: str, init_adapter: str | Path, tokenized_dir: str | Path,
                  adapter_dir: str | Path, checkpoints_dir: str | Path | None = None, *, callbacks: list | None = None,
                  data_collator=None, trainer_class=None, arguments: dict | None = None) -> Path:
    """Train from the initial adapter into `adapter_dir` (adapter + tokenizer + history.json), laid out as `plan`.

    `callbacks`: more TrainerCallbacks; `data_collator` (default: `collator` for the plan's packing and attention);
    `trainer_class`: a Trainer subclass to build on; `arguments`: more TrainingArguments fields."""
    import shutil

    from personatune.plan import apply_plan_to_config
    from personatune.speedups import apply_plan, optimizer_without_host_syncs

    adapter_dir = Path(adapter_dir)
    if is_complete(adapter_dir):
        return adapter_dir
    checkpoints = Path(checkpoints_dir) if checkpoints_dir else adapter_dir.with_name(adapter_dir.name + ".checkpoints")
    logger.info("training layout: %s", plan.describe())
    print(f"Training layout: {plan.describe()}", flush=True)
    tok = load_tokenizer(resolved, cfg.base_revision)
    data = load_tokenized(tokenized_dir)
    held_out = len(data["eval"]) > 0
    cfg = apply_plan_to_config(cfg, plan)
    args = training_arguments(cfg, checkpoints, len(data["train"]), plan, held_out=held_out, **(arguments or {}))
    held_out = args.eval_strategy != "no"  # measured during training (not when the last step is the only measurement)
    if args.n_gpu > 1:
        raise RuntimeError(f"this process sees {args.n_gpu} GPUs: the Trainer would wrap the model in nn.DataParallel "
                           "(a bigger batch per step than planned). Run it pinned to one GPU (CUDA_VISIBLE_DEVICES) or "
                           "one rank per GPU (personatune.distributed).")

    # load -> speed-ups -> Trainer -> train -> save
    model = load_qlora_model(resolved, cfg, adapter_dir=str(init_adapter), trainable=True)
    apply_plan(model, plan, compute_dtype(cfg.compute_dtype))
    recorder = StepLosses()
    callbacks = list(callbacks or []) + [recorder.callback()]
    if held_out and cfg.early_stopping_patience > 0:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    device = next(model.parameters()).device
    trainer = recorder.trainer_class(trainer_class)(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"] if held_out else None,
        data_collator=data_collator or collator(tok, plan.packing, varlen=plan.attention == "varlen"),
        processing_class=tok, callbacks=callbacks,
        optimizer_cls_and_kwargs=optimizer_without_host_syncs(args, model) if device.type == "cuda" else None)
    resume = last_checkpoint(checkpoints)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the training's peak, not the load's
    result = trainer.train(resume_from_checkpoint=resume)
    memory = training_peak_gib(device, plan)
    if memory:  # what calibrates the plan's memory model (personatune.plan.estimate_peak_gib)
        print(f"Training memory: peak {memory['allocated']:.2f} GiB allocated, {memory['reserved']:.2f} GiB reserved "
              f"(plan estimate {memory['estimated']} GiB)", flush=True)
    history = [
        {"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"], "learning_rate": e.get("learning_rate")}
        for e in trainer.state.log_history if "loss" in e
    ]
    if args.logging_steps > 1:  # the Trainer logged every few steps only: the recorder has every step
        history = recorder.history(history)
    held_out_curve = [{"step": e["step"], "epoch": e.get("epoch"), "eval_loss": e["eval_loss"]}
                      for e in trainer.state.log_history if "eval_loss" in e]
    best = trainer.state.best_model_checkpoint
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp)
        tok.chat_template = bundle_chat_template(tok, cfg.prompt_format)  # chat_template.jinja: the trained format
        tok.save_pretrained(tmp)
        (tmp / "history.json").write_text(json.dumps({
            "resumed_from": Path(resume).name if resume else None,
            "global_step": trainer.state.global_step,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "layout": plan.to_dict(),
            "loss": history,
            "eval_loss": held_out_curve,
            "best_step": int(best.rsplit("-", 1)[1]) if best else None,
            "best_eval_loss": trainer.state.best_metric if best else None,
            "stopped_early": trainer.state.global_step < trainer.state.max_steps,
            "peak_memory_gib": memory,
        }, indent=2) + "\n")
    shutil.rmtree(checkpoints, ignore_errors=True)
    return adapter_dir


def training_peak_gib(device, plan) -> dict | None:
    """Peak CUDA memory of this process since the last reset (allocated and reserved, GiB) next to the plan's
    estimate; None off CUDA."""
    if getattr(device, "type", None) != "cuda":
        return None
    from personatune.plan import GIB

    return {"allocated": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
            "reserved": round(torch.cuda.max_memory_reserved(device) / GIB, 2),
            "estimated": None if plan.estimated_peak_gib is None else round(plan.estimated_peak_gib, 2)}


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error in this process, or a rank that exited because of one (RankFailed)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or bool(getattr(error, "out_of_memory", False))


def train_with_oom_backoff(plan, attempt, *, log=print, free_memory=None, card_gib: float | None = None) -> Path:
    """`attempt(plan)` (train_adapter in this process, or a torchrun group), retried after an out-of-memory error
    with the layout `personatune.plan.next_layout_after_oom` gives for the attempt that failed: the same examples
    per optimizer step, less memory. A retry resumes from the last checkpoint when there is one. When no smaller
    layout is left it raises `DoesNotFit` (card size, every layout tried, what to do) instead of looping.

    Before a retry the failed Trainer, model and optimizer state must be gone, or the retry starts with the
    memory that just ran out still held: they are referenced from the exception's traceback (train_adapter's
    frame), so the exception is dropped first, then `free_memory` (default: `free_accelerator_memory`) runs.
    """
    from personatune.plan import does_not_fit, next_layout_after_oom, short_layout

    free_memory = free_memory or free_accelerator_memory
    tried = []
    while True:
        tried.append(plan)
        try:
            return attempt(plan)
        except BaseException as error:  # noqa: BLE001 - anything but out-of-memory is re-raised at once
            if not is_out_of_memory(error):
                raise
            message = str(error)
        # out of the except block: the exception, its traceback and the failed run's frames are released here
        free_memory()
        retry = next_layout_after_oom(plan)
        if retry is None:
            raise does_not_fit(tried, card_gib, message)
        log(f"CUDA out of memory with {short_layout(plan)}; retrying with {short_layout(retry)} "
            f"(effective batch {retry.micro_batch_size * retry.grad_accum} kept)")
        plan = retry


def run_training(cfg: FinetuneConfig, resolved: str, init_adapter: str | Path, tokenized_dir: str | Path,
                 adapter_dir: str | Path, checkpoints_dir: str | Path | None = None, *, callbacks: list | None = None,
                 log=print, warn=None) -> Path:
    """What the flow's training task runs. The plan is made once, here; then either `train_adapter` in this
    process (CPU, or the one GPU this process sees) or one rank per GPU started by torchrun on exactly the GPUs
    `num_gpus` asks for (personatune.distributed; also for one GPU of several, so the Trainer never sees more
    GPUs than it should). Out-of-memory errors back off the same way on both paths. `callbacks` reach the
    in-process Trainer; the ranks' lines reach `log`."""
    from personatune import distributed
    from personatune.plan import card_memory_gib

    adapter_dir = Path(adapter_dir)
    if is_complete(adapter_dir):
        return adapter_dir
    devices = distributed.devices_for(cfg)
    plan = plan_for_run(cfg, resolved, tokenized_dir)
    if devices is None:
        def attempt(p):
            return train_adapter(cfg, p, resolved, init_adapter, tokenized_dir, adapter_dir, checkpoints_dir,
                                 callbacks=callbacks)
    else:
        def attempt(p):
            return distributed.train_distributed(cfg, p, resolved, init_adapter, tokenized_dir, adapter_dir,
                                                 checkpoints_dir, devices=devices, log=log)
    return train_with_oom_backoff(plan, attempt, log=warn or log, card_gib=card_memory_gib())


def free_accelerator_memory() -> None:
    """Collect what the failed run left (its objects reference each other, so reference counting alone does not
    free them), then hand the CUDA caching allocator's free blocks back."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
