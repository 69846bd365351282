"""Faults a scheduled retrain must survive: a kill mid-training, concurrent runs, out-of-memory, a missing
base model, bad parameters. Nothing is lost and no half-written bundle is ever visible to a reader."""
from __future__ import annotations

import json
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
    env = env_for(tmp_path)
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


def test_cuda_oom_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, small_csv, base_model_dir, tokenizer):
    from transformers import TrainerCallback

    from personatune.config import FinetuneConfig
    from personatune.data import build_dataset
    from personatune.model import build_model
    from personatune.tokenization import tokenize_dataset
    from personatune.train import train_with_oom_backoff

    class OOMAboveOne(TrainerCallback):
        """Fault injection: behaves like a card that only fits one example per forward pass."""
        seen: list = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.seen.append((args.per_device_train_batch_size, args.gradient_accumulation_steps))

        def on_step_begin(self, args, state, control, **kwargs):
            if args.per_device_train_batch_size > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    cfg = FinetuneConfig(quotes_csv=str(small_csv), micro_batch_size=4, grad_accum=2, max_steps=1, eval_fraction=0.2)
    ds = build_dataset(small_csv, cfg.eval_fraction, tmp_path / "ds")
    tok_dir = tokenize_dataset(ds, tokenizer, cfg.max_seq_len, cfg.on_long_row, tmp_path / "tok")
    init = build_model(base_model_dir, cfg, tmp_path / "init")
    messages = []
    adapter = train_with_oom_backoff(cfg, base_model_dir, init / "adapter", tok_dir, tmp_path / "adapter",
                                     callbacks=[OOMAboveOne()], log=messages.append)
    assert OOMAboveOne.seen == [(4, 2), (2, 4), (1, 8)]  # effective batch 8 throughout
    assert len(messages) == 2 and "retrying with micro_batch_size=2 x grad_accum=4 (effective batch 8" in messages[0]
    assert (adapter / "adapter_model.safetensors").is_file()


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
