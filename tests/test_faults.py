"""Faults a scheduled retrain must survive: a kill mid-training, concurrent runs, out-of-memory, a missing
base model, bad parameters. Nothing is lost and no half-written bundle is ever visible to a reader."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, write_csv

FAST = ["--micro-batch-size", "4", "--grad-accum", "1", "--num-samples", "0", "--probes-csv", "",
        "--golden-csv", str(ROOT / "tests" / "data" / "golden_small.csv"), "--force-promote",
        "--max-new-tokens", "8", "--eval-fraction", "0.2"]


@pytest.fixture
def small_csv(tmp_path, good_rows) -> Path:
    return write_csv(tmp_path / "quotes.csv", good_rows)


def finetune_cmd(csv: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.finetune", "--quotes-csv", str(csv), "--output-dir", str(out), *FAST, *extra]


def env_for(tmp_path: Path) -> dict:
    home = tmp_path / "prefect-home"
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
            "PREFECT_API_URL": "", "PYTHONUNBUFFERED": "1"}


def complete_bundles(out: Path) -> list[Path]:
    return [p for p in out.iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and (p / ".complete").is_file()]


def test_sigkill_after_a_checkpoint_resumes_and_finishes(tmp_path, small_csv):
    out = tmp_path / "outputs"
    env = env_for(tmp_path)
    # 36 of the 40 rows land in the train split (hash split, eval_fraction 0.2): 5 steps of <= 8 an epoch,
    # 2 epochs, a checkpoint at the end of each epoch
    args = ("--epochs", "2", "--micro-batch-size", "8")
    proc = subprocess.Popen(finetune_cmd(small_csv, out, *args), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    checkpoint = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((out / ".cache" / "train").glob("*.checkpoints/checkpoint-*/trainer_state.json"))
        if found:
            checkpoint = found[0].parent
            break
        time.sleep(0.5)
    assert checkpoint is not None, "no checkpoint appeared before the run ended"
    os.killpg(proc.pid, signal.SIGKILL)  # the flow, its temporary Prefect server, everything
    proc.wait()
    assert not (out / "latest").exists() and not complete_bundles(out)  # nothing half-done is visible

    rerun = subprocess.run(finetune_cmd(small_csv, out, *args), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    bundle = (out / "latest").resolve()
    history = json.loads((bundle / "history.json").read_text())
    assert history["resumed_from"] is not None and history["resumed_from"].startswith("checkpoint-")
    assert int(history["resumed_from"].split("-")[1]) >= int(checkpoint.name.split("-")[1])
    from personatune.data import load_quotes, split_of

    rows = load_quotes(small_csv)
    train_rows = sum(split_of(i, u, 0.2) == "train" for i, u in zip(rows["instruction"], rows["user"]))
    assert train_rows == 36 and history["global_step"] == 2 * 5
    assert (bundle / "adapter_model.safetensors").stat().st_size > 100_000
    assert complete_bundles(out) == [bundle]
    assert not list(out.glob(".tmp-*")) and not list((out / ".cache" / "train").glob(".tmp-*"))


def test_two_concurrent_runs_finish_in_separate_folders(tmp_path, small_csv):
    out = tmp_path / "outputs"
    env = {**env_for(tmp_path), "OMP_NUM_THREADS": "1"}  # a core each: two 2-thread runs on 2 cores thrash
    runs = [subprocess.Popen(finetune_cmd(small_csv, out, "--max-steps", "2", "--seed", str(seed), "--run-name", f"seed{seed}"),
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for seed in (1, 2)]
    seen_latest = set()
    while any(r.poll() is None for r in runs):
        link = out / "latest"
        if link.is_symlink():
            target = out / os.readlink(link)
            seen_latest.add((target.name, (target / ".complete").is_file()))
        time.sleep(0.2)
    logs = [r.stdout.read() for r in runs]
    assert [r.returncode for r in runs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert sorted(p.name for p in complete_bundles(out)) == ["seed1", "seed2"]
    assert all(complete for _, complete in seen_latest)  # latest only ever named a complete bundle
    a, b = (json.loads((out / n / "training_config.json").read_text()) for n in ("seed1", "seed2"))
    assert a["config"]["seed"] == 1 and b["config"]["seed"] == 2


def prepared_training(tmp_path: Path, csv: Path, tokenizer, base_model_dir: str, **settings):
    """Config, tokenized data and initial adapter of a tiny run (the core functions, no Prefect)."""
    from personatune.config import FinetuneConfig
    from personatune.data import build_dataset
    from personatune.model import build_model
    from personatune.tokenization import tokenize_dataset

    cfg = FinetuneConfig(quotes_csv=str(csv), eval_fraction=0.2, output_dir=str(tmp_path / "outputs"), **settings)
    ds = build_dataset(csv, cfg.eval_fraction, tmp_path / "ds")
    tok_dir = tokenize_dataset(ds, tokenizer, cfg.max_seq_len, cfg.on_long_row, tmp_path / "tok")
    return cfg, tok_dir, build_model(base_model_dir, cfg, tmp_path / "init")


def trainer_callback(**hooks):
    """A `TrainerCallback` with the given hooks (on_step_begin=..., ...): faults injected the way a card shows
    them, through the training function's own `callbacks` parameter."""
    from transformers import TrainerCallback

    return type("Injected", (TrainerCallback,), hooks)()


def test_cuda_oom_halves_the_micro_batch_and_frees_the_failed_model_first(tmp_path, small_csv, base_model_dir,
                                                                          tokenizer):
    """No checkpoint yet (the OOM comes before step 1): every attempt starts over with half the micro-batch.
    When memory is released, the model of the failed attempt must already be unreachable."""
    import gc
    import weakref

    from personatune.train import plan_for_run, train_adapter, train_with_oom_backoff

    seen, failed, freed = [], [], []

    def on_train_begin(self, args, state, control, **kwargs):
        seen.append((args.per_device_train_batch_size, args.gradient_accumulation_steps))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if args.per_device_train_batch_size > 1:  # a card that only fits one example per forward pass
            failed.append(weakref.ref(model))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    def free_memory():  # where the real one calls torch.cuda.empty_cache()
        gc.collect()
        freed.append([ref() is None for ref in failed])

    cfg, tok_dir, init = prepared_training(tmp_path, small_csv, tokenizer, base_model_dir, micro_batch_size=4,
                                           grad_accum=2, max_steps=1)
    messages = []
    injected = trainer_callback(on_train_begin=on_train_begin, on_step_begin=on_step_begin)
    adapter = train_with_oom_backoff(
        plan_for_run(cfg, base_model_dir, tok_dir),
        lambda plan: train_adapter(cfg, plan, base_model_dir, init / "adapter", tok_dir, tmp_path / "adapter",
                                   callbacks=[injected]),
        log=messages.append, free_memory=free_memory)
    assert seen == [(4, 2), (2, 4), (1, 8)]  # effective batch 8 throughout, halved from the attempt that failed
    assert messages == ["CUDA out of memory with 4 x 2, checkpointing off; retrying with 2 x 4, checkpointing off "
                        "(effective batch 8 kept)",
                        "CUDA out of memory with 2 x 4, checkpointing off; retrying with 1 x 8, checkpointing off "
                        "(effective batch 8 kept)"]
    assert freed == [[True], [True, True]]  # each failed model collected before the memory was released
    assert (adapter / "adapter_model.safetensors").is_file()


def test_cuda_oom_after_a_checkpoint_resumes_from_it_in_the_training_task(tmp_path, small_csv, base_model_dir,
                                                                          tokenizer, prefect_env):
    """Through the Prefect task: a checkpoint every 2 steps, out of memory before step 3. The task retries with
    half the micro-batch and twice the accumulation, resumes at step 2 (steps 1-2 are not trained again), and
    the failed attempt's model is gone before the retry loads its own."""
    import weakref

    from tasks.train import train_lora

    attempts, failed = [], []

    def on_train_begin(self, args, state, control, **kwargs):
        attempts.append({"batch": (args.per_device_train_batch_size, args.gradient_accumulation_steps),
                         "steps": [], "failed_models_alive": [ref() is not None for ref in failed]})

    def on_step_end(self, args, state, control, **kwargs):
        attempts[-1]["steps"].append(state.global_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2 and args.per_device_train_batch_size > 2:
            checkpoints = Path(args.output_dir)
            attempts[-1]["checkpoints"] = sorted(p.parent.name for p in checkpoints.glob("checkpoint-*/trainer_state.json"))
            failed.append(weakref.ref(model))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    cfg, tok_dir, init = prepared_training(tmp_path, small_csv, tokenizer, base_model_dir, micro_batch_size=4,
                                           grad_accum=2, max_steps=4, eval_every_steps=2)
    # the Prefect task itself (train_lora wraps it with the stage cache, which needs a flow around it)
    task_log: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = task_log.append
    logging.getLogger("prefect.task_runs").addHandler(handler)
    try:
        adapter = Path(train_lora.task(out_dir=str(tmp_path / "adapter"), config=cfg.to_dict(), base_model=base_model_dir,
                                       model_fingerprint="test", init_adapter=str(init), tokenized_dir=str(tok_dir),
                                       callbacks=[trainer_callback(on_train_begin=on_train_begin, on_step_end=on_step_end,
                                                                   on_step_begin=on_step_begin)]))
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(handler)
    first, retry = attempts
    assert first["batch"] == (4, 2) and first["steps"] == [1, 2]
    assert first["checkpoints"] == ["checkpoint-2"]  # the fault comes after a complete checkpoint
    assert retry["batch"] == (2, 4) and retry["steps"] == [3, 4]  # resumed: steps 1 and 2 not redone
    assert retry["failed_models_alive"] == [False]
    history = json.loads((adapter / "history.json").read_text())
    assert history["resumed_from"] == "checkpoint-2" and history["global_step"] == 4
    assert [e["step"] for e in history["loss"]] == [1, 2, 3, 4]
    # said on the task's run logger (read at the logger itself: Prefect's console handler may hold an earlier test's
    # stderr, and whether its records propagate to pytest's caplog depends on what configured logging before)
    assert [r.getMessage() for r in task_log if "out of memory" in r.getMessage()] == [
        "CUDA out of memory with 4 x 2, checkpointing off; retrying with 2 x 4, checkpointing off (effective batch 8 kept)"]
    assert (adapter / ".complete").is_file() and not adapter.with_name(adapter.name + ".checkpoints").exists()


def test_an_incomplete_checkpoint_is_skipped_on_resume(tmp_path, small_csv, base_model_dir, tokenizer):
    """A kill while checkpoint-2 was being saved leaves it without trainer_state.json (the Trainer writes it
    last): the next run resumes from checkpoint-1, the newest complete one."""
    from personatune.train import plan_for_run, train_adapter

    steps = []

    def on_step_end(self, args, state, control, **kwargs):
        steps.append(state.global_step)

    def killed_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt("killed before step 3")

    cfg, tok_dir, init = prepared_training(tmp_path, small_csv, tokenizer, base_model_dir, micro_batch_size=8,
                                           grad_accum=1, max_steps=3, eval_every_steps=1)
    adapter, checkpoints = tmp_path / "adapter", tmp_path / "adapter.checkpoints"
    plan = plan_for_run(cfg, base_model_dir, tok_dir)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(cfg, plan, base_model_dir, init / "adapter", tok_dir, adapter, checkpoints,
                      callbacks=[trainer_callback(on_step_begin=killed_at_step_3)])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    (checkpoints / "checkpoint-2" / "trainer_state.json").unlink()  # what a kill mid-save leaves

    train_adapter(cfg, plan, base_model_dir, init / "adapter", tok_dir, adapter, checkpoints,
                  callbacks=[trainer_callback(on_step_end=on_step_end)])
    history = json.loads((adapter / "history.json").read_text())
    assert history["resumed_from"] == "checkpoint-1" and history["global_step"] == 3
    assert steps == [2, 3]  # step 2 trained again (its checkpoint was incomplete), step 1 not


WRITER = """
import sys, time
from personatune.files import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 4096)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_the_temp_folder_of_a_killed_writer_is_removed_and_live_writers_keep_theirs(tmp_path):
    """Two processes write `final` through atomic_dir; one is SIGKILLed mid-write and leaves its temp folder.
    The next writer removes that orphan (its pid is dead), keeps the live writer's folder, and completes."""
    from personatune.files import atomic_dir, is_complete

    final = tmp_path / "outputs" / "run-1"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(final)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        killed, live = (Path(w.stdout.readline().strip()) for w in writers)
        assert killed.name.startswith(f".tmp-run-1-{writers[0].pid}-") and (killed / "half.bin").is_file()
        writers[0].kill()
        writers[0].wait()
        assert killed.is_dir()  # the orphan: nobody removed it when its writer died

        with atomic_dir(final) as tmp:
            assert not killed.exists()  # removed when this writer started
            assert (live / "half.bin").is_file()  # a live writer's folder is left alone
            (tmp / "done.txt").write_text("ok")
        assert is_complete(final) and (final / "done.txt").read_text() == "ok"
        assert writers[1].poll() is None and live.is_dir()
    finally:
        for w in writers:
            w.kill()
            w.wait()


def test_missing_base_model_fails_before_any_work(tmp_path, small_csv):
    out = tmp_path / "outputs"
    proc = subprocess.run(finetune_cmd(small_csv, out, "--base-model", str(tmp_path / "no-such-model")), cwd=ROOT,
                          env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"base model folder {tmp_path / 'no-such-model'} does not exist" in proc.stderr
    assert not (out / ".cache").exists()  # failed before validation, tokenization or any model load


def test_bad_parameters_are_rejected_before_work_starts(tmp_path, small_csv):
    from personatune.config import ConfigError

    out = tmp_path / "outputs"
    # through the CLI: argparse types
    proc = subprocess.run(finetune_cmd(small_csv, out, "--lora-r", "eight"), cwd=ROOT, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--lora-r" in proc.stderr
    # as flow parameters (what the UI and event triggers send): the same checks as the flags
    from personatune.config import check_paths, from_mapping

    with pytest.raises(ConfigError, match="eval_fraction must be in"):
        from_mapping({"eval_fraction": "1.5"})
    with pytest.raises(ConfigError, match="on_long_row must be"):
        from_mapping({"on_long_row": "ignore"})
    with pytest.raises(ConfigError, match="file not found: quotes_csv='nope.csv'"):
        check_paths(from_mapping({"quotes_csv": "nope.csv"}))
    # Prefect checks the declared types of a deployment run's parameters before the flow starts
    from prefect.exceptions import ParameterTypeError

    from flows.finetune import finetune

    with pytest.raises(ParameterTypeError):
        finetune.validate_parameters({"lora_r": "eight"})
    assert finetune.validate_parameters({"lora_r": "16"})["lora_r"] == 16
    assert not out.exists()


def test_cpu_generation_batches_hold_the_evaluation_sets_of_a_small_model_and_few_rows_of_a_big_one():
    """On a CPU both evaluation sets (136 prompts) go in one batch for the embedded model, contrast included; a
    7B-shaped model's fp32 KV caches would be tens of GiB for as many rows, so it gets a few."""
    from types import SimpleNamespace

    from personatune.evaluate import GENERATION_BATCH, cpu_rows_that_fit

    smollm2 = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    llama7b = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
                              head_dim=128)
    assert cpu_rows_that_fit(GENERATION_BATCH, smollm2, 64 + 50, caches=2) == GENERATION_BATCH >= 136
    # 7B: 32 layers x 2 x 4096 x 4 bytes = 1 MiB a token; 114 tokens x 2 caches = 228 MiB a row; 3 GiB hold 13 rows
    assert cpu_rows_that_fit(GENERATION_BATCH, llama7b, 64 + 50, caches=2) == 13
    assert cpu_rows_that_fit(GENERATION_BATCH, llama7b, 64 + 50, caches=1) == 26
    assert cpu_rows_that_fit(GENERATION_BATCH, llama7b, 4096, caches=2) == 1  # never below one row


def test_evaluation_batches_fit_the_free_memory_and_shrink_on_out_of_memory():
    from personatune.evaluate import in_batches, rows_that_fit

    assert rows_that_fit(16, 140, 49152, None) == 16                      # CPU: the measured default
    assert rows_that_fit(16, 140, 49152, 80 * 2**30) == 16                 # a big card: the default
    assert rows_that_fit(32, 190, 49152, 2 * 2**30) == 11                  # 2 GiB free: half of it for the logits
    assert rows_that_fit(32, 190, 49152, 10 * 2**20) == 1                  # never below one row
    sizes = []

    def run(start, end):
        sizes.append(end - start)
        if end - start > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return list(range(start, end))

    parts = in_batches(10, 16, run)
    assert [i for p in parts for i in p] == list(range(10))  # every row once, in order
    assert sizes == [10, 5, 2, 2, 2, 2, 2]                    # the failed batch halved, then kept small
    with pytest.raises(torch.cuda.OutOfMemoryError):           # one row does not fit: the error, not a loop
        in_batches(3, 4, lambda s, e: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("no")))


def test_held_out_loss_is_the_mean_over_reply_tokens_of_every_row(base_model_dir, tokenizer):
    """mean_loss (rows sorted by length, logits only where a row of the batch has a label) equals the plain
    computation: each row alone, every position's logits, cross-entropy summed over its reply tokens."""
    from personatune.config import FinetuneConfig
    from personatune.evaluate import mean_loss
    from personatune.model import load_base_model
    from personatune.tokenization import IGNORE_INDEX, encode_example
    from tests.test_packing import ROWS

    rows = ROWS + [("Be grim.", "Any plans for the weekend?", "Digging, mostly. The garden keeps its secrets badly."),
                   ("Give grim advice as Wednesday Addams.", "My sister borrowed my sweater without asking. What now?",
                    "Borrow her diary. Read it aloud at dinner. Return it, annotated.")]
    rows = [dict(zip(("input_ids", "labels"), encode_example(tokenizer, *r))) for r in rows]
    rows = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
    assert len({len(r["input_ids"]) for r in rows}) == len(rows)  # all lengths differ: batches are padded
    model = load_base_model(base_model_dir, FinetuneConfig(compute_dtype="fp32", load_in_4bit=False)).eval()
    total = tokens = 0
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(r["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
    assert mean_loss(model, rows, tokenizer, batch_size=2) == pytest.approx(total / tokens, rel=1e-5)
    assert 0.5 < total / tokens < 15


def test_held_out_loss_is_the_same_when_batches_run_out_of_memory(base_model_dir, tokenizer, tmp_path, good_rows):
    """mean_loss retried in smaller batches after an out-of-memory error gives the loss of the full batches."""
    from personatune.evaluate import mean_loss
    from personatune.model import load_base_model
    from personatune.config import FinetuneConfig
    from personatune.data import build_dataset
    from personatune.tokenization import load_tokenized, tokenize_dataset

    cfg = FinetuneConfig(compute_dtype="fp32", load_in_4bit=False)
    ds = build_dataset(write_csv(tmp_path / "q.csv", good_rows), 0.2, tmp_path / "ds")
    rows = load_tokenized(tokenize_dataset(ds, tokenizer, cfg.max_seq_len, cfg.on_long_row, tmp_path / "tok"))["train"]
    rows = rows.select(range(12))
    model = load_base_model(base_model_dir, cfg)
    full = mean_loss(model, rows, tokenizer)
    batches = []

    def small_card(module, args, kwargs):
        batches.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    hook = model.register_forward_pre_hook(small_card, with_kwargs=True)
    try:
        retried = mean_loss(model, rows, tokenizer)
    finally:
        hook.remove()
    assert batches[:3] == [12, 6, 3] and max(batches[2:]) == 3 and sum(batches[2:]) == len(rows) == 12
    assert abs(retried - full) / full < 1e-5 and 0.5 < full < 15
