"""Train the LoRA adapters with the Hugging Face Trainer.

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
    `max_length_*`) for the varlen flash attention of the GPU profiles (personatune/profiles.py).
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                          return_flash_attn_kwargs=varlen)
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def training_arguments(cfg: FinetuneConfig, output_dir: Path, train_rows: int, plan=None, held_out: bool = False):
    """TrainingArguments of the recipe. With a GPU profile's `plan`, checkpointing is set per layer on the model
    (profiles.apply_plan), so the Trainer must not switch it on for every layer again.

    With `held_out` rows the held-out loss is measured every `eval_every_steps` (or once an epoch) and at the last
    step, a checkpoint is saved at each measurement, and the best one (lowest held-out loss) is what training
    returns: a last epoch that overfits does not replace a better earlier one."""
    from transformers import TrainingArguments

    dtype = compute_dtype(cfg.compute_dtype)
    steps_per_epoch = math.ceil(train_rows / (cfg.micro_batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
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
        save_steps=cfg.eval_every_steps or max(1, steps_per_epoch),
        save_total_limit=2,  # with load_best_model_at_end the Trainer keeps the best one besides the newest
        eval_strategy="steps" if held_out else "no",
        eval_steps=cfg.eval_every_steps or max(1, steps_per_epoch),
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
        use_cpu=not torch.cuda.is_available(),
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

    def trainer_class(self):
        from transformers import Trainer

        recorder = self

        class RecordingTrainer(Trainer):
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


def train_adapter(cfg: FinetuneConfig, resolved: str, init_adapter: str | Path, tokenized_dir: str | Path,
                  adapter_dir: str | Path, checkpoints_dir: str | Path | None = None,
                  callbacks: list | None = None, max_micro_batch: int | None = None) -> Path:
    """Train from the initial adapter into `adapter_dir` (adapter + tokenizer + history.json).

    `max_micro_batch` caps the examples per forward pass (after an out-of-memory error); the optimizer step
    keeps its size through more accumulation."""
    import dataclasses
    import shutil

    from personatune.profiles import ModelShape, apply_plan, apply_plan_to_config, plan_training

    adapter_dir = Path(adapter_dir)
    if is_complete(adapter_dir):
        return adapter_dir
    checkpoints = Path(checkpoints_dir) if checkpoints_dir else adapter_dir.with_name(adapter_dir.name + ".checkpoints")
    tok = load_tokenizer(resolved, cfg.base_revision)
    data = load_tokenized(tokenized_dir)
    plan = plan_training(cfg, ModelShape.from_pretrained(resolved, cfg.base_revision) if torch.cuda.is_available() else None,
                         [len(x) for x in data["train"]["input_ids"]])
    if max_micro_batch and plan.micro_batch_size > max_micro_batch:
        micro = split_at_most(plan.micro_batch_size * plan.grad_accum, max_micro_batch)
        plan = dataclasses.replace(plan, micro_batch_size=micro, grad_accum=plan.micro_batch_size * plan.grad_accum // micro,
                                   reason=plan.reason + f"; micro-batch capped at {max_micro_batch} after out-of-memory")
    logger.info("training layout: %s", plan.describe())
    print(f"Training layout: {plan.describe()}", flush=True)
    cfg = apply_plan_to_config(cfg, plan)
    model = load_qlora_model(resolved, cfg, adapter_dir=str(init_adapter), trainable=True)
    apply_plan(model, plan, compute_dtype(cfg.compute_dtype))
    held_out = len(data["eval"]) > 0
    args = training_arguments(cfg, checkpoints, len(data["train"]), plan, held_out=held_out)
    recorder = StepLosses()
    callbacks = list(callbacks or []) + [recorder.callback()]
    if held_out and cfg.early_stopping_patience > 0:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = recorder.trainer_class()(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"] if held_out else None,
        data_collator=collator(tok, cfg.packing, varlen=plan.attention == "varlen"),
        processing_class=tok, callbacks=callbacks)
    resume = last_checkpoint(checkpoints)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except torch.cuda.OutOfMemoryError as oom:
        oom.micro_batch_size = plan.micro_batch_size  # what did not fit, for train_with_oom_backoff
        raise
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
        }, indent=2) + "\n")
    shutil.rmtree(checkpoints, ignore_errors=True)
    return adapter_dir


def split_at_most(effective: int, cap: int) -> int:
    """The largest micro-batch <= cap that divides the optimizer step exactly."""
    return max(m for m in range(1, min(cap, effective) + 1) if effective % m == 0)


def train_with_oom_backoff(cfg: FinetuneConfig, *args, log=print, free_memory=None, **kwargs) -> Path:
    """`train_adapter`, but a CUDA out-of-memory error retries with half the micro-batch and more gradient
    accumulation, so the optimizer step (and what is learned) stays the same; it says so through `log`.
    The retry resumes from the last checkpoint when there is one. Gives up at one example per pass.

    Before the retry the failed Trainer, model and optimizer state must be gone, or the retry starts with the
    memory that just ran out still held: they are referenced from the exception's traceback (train_adapter's
    frame), so the exception is dropped first, then `free_memory` (default: `free_accelerator_memory`) runs.
    """
    free_memory = free_memory or free_accelerator_memory
    cap = None
    while True:
        try:
            return train_adapter(cfg, *args, max_micro_batch=cap, **kwargs)
        except torch.cuda.OutOfMemoryError as oom:
            used = getattr(oom, "micro_batch_size", cfg.micro_batch_size)
            if used <= 1:
                raise
        # out of the except block: the exception, its traceback and the failed run's frames are released here
        effective = cfg.micro_batch_size * cfg.grad_accum
        cap = split_at_most(effective, used // 2)
        log(f"CUDA out of memory at micro_batch_size={used}; retrying with micro_batch_size={cap} x "
            f"grad_accum={effective // cap} (effective batch {effective} kept)")
        free_memory()


def free_accelerator_memory() -> None:
    """Collect what the failed run left (its objects reference each other, so reference counting alone does not
    free them), then hand the CUDA caching allocator's free blocks back."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
