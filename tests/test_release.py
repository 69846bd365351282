"""The release gate (champion vs challenger), the data diff, the release log and rollback; best checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from personatune.release import (diff_rows, judge, last_trained_data, read_log, record, release_entry, rollback)


def card(loss: float, sim: float | None = 0.30, run_on: float = 0.0) -> dict:
    return {"golden_loss": loss, "persona_similarity": sim, "run_on_rate": run_on, "loop_rate": 0.0}


def test_first_release_is_judged_against_the_base():
    ok = judge({"base": card(4.5), "challenger": card(3.8)})
    assert ok.promoted and ok.against == "base" and "vs base 4.5000" in ok.reason
    assert not judge({"base": card(4.5), "challenger": card(3.8)}, min_improvement_over_base=0.2).promoted
    worse = judge({"base": card(4.5), "challenger": card(4.6)})
    assert not worse.promoted and worse.reason.startswith("rejected against the base: golden loss 4.6000")


def test_challenger_must_not_be_worse_than_the_champion_beyond_the_tolerances():
    metrics = {"base": card(4.5, 0.17), "champion": card(3.70, 0.32)}
    same = judge({**metrics, "challenger": card(3.72, 0.31)}, max_loss_increase=0.01, max_similarity_drop=0.02)
    assert same.promoted and same.against == "champion"  # +0.5% loss and -0.01 similarity: within tolerance
    loss = judge({**metrics, "challenger": card(3.80, 0.33)}, max_loss_increase=0.01)
    assert not loss.promoted and [c.metric for c in loss.failed] == ["golden_loss"]
    assert "golden loss 3.8000 vs champion 3.7000 (+2.7%, tolerance +1.0%)" in loss.reason
    voice = judge({**metrics, "challenger": card(3.60, 0.25)}, max_similarity_drop=0.02)
    assert not voice.promoted and [c.metric for c in voice.failed] == ["persona_similarity"]
    assert voice.failed[0].limit == pytest.approx(0.30)
    run_on = judge({**metrics, "challenger": card(3.60, 0.40, run_on=0.02)})
    assert not run_on.promoted and "run-on rate 2.0% (must be 0%)" in run_on.reason
    forced = judge({**metrics, "challenger": card(3.80, 0.33)}, force=True)
    assert forced.promoted and forced.forced and "--force-promote" in forced.reason
    no_sim = judge({"base": card(4.5, None), "champion": card(3.7, None), "challenger": card(3.7, None)})
    assert no_sim.promoted and [c.metric for c in no_sim.checks] == ["golden_loss", "persona_similarity", "run_on_rate"]
    assert "persona similarity skipped" in no_sim.reason  # said, not silently dropped
    same = judge({**metrics, "challenger": card(9.9, 0.0, run_on=1.0)}, identical_to="run-a")
    assert same.promoted and "byte-identical to the champion run-a's" in same.reason  # nothing to compare


def rows(*triples):
    return [{"instruction": i, "user": u, "response": r} for i, u, r in triples]


def test_data_diff_counts_added_removed_and_edited_rows_by_instruction_and_user():
    old = rows(("I", "a", "1"), ("I", "b", "2"), ("I", "c", "3"), ("J", "a", "4"))
    new = rows(("I", "a", "1"), ("I", "b", "2 edited"), ("J", "a", "4"), ("I", "d", "5"), ("I", "e", "6"))
    d = diff_rows(old, new, samples=1)
    assert (d["added"], d["removed"], d["edited"], d["unchanged"]) == (2, 1, 1, 2)
    assert d["samples"]["added"] == [{"user": "d", "response": "5"}]
    assert d["samples"]["removed"] == [{"user": "c", "response": "3"}]
    assert d["samples"]["edited"] == [{"user": "b", "before": "2", "after": "2 edited"}]
    assert diff_rows(None, new) is None  # no champion: nothing to compare with
    shifted = rows(("I", "a", "2"), ("I", "b", "3"), ("I", "c", "1"))  # a response column moved by one row
    assert diff_rows(old[:3], shifted)["edited"] == 3


def fake_bundle(outputs: Path, run: str, loss: float, data: str = "d" * 64) -> Path:
    bundle = outputs / run
    bundle.mkdir(parents=True)
    (bundle / "training_config.json").write_text(json.dumps({"data_sha256": data}))
    (bundle / "eval.json").write_text(json.dumps({"metrics": {"challenger": card(loss)}}))
    (bundle / ".complete").write_text("")
    return bundle


def test_release_log_and_rollback_move_the_champion_and_keep_every_line(tmp_path):
    from personatune.release import champion_bundle, promote

    out = tmp_path / "outputs"
    verdict = {"promoted": True, "forced": False, "against": "base", "reason": "promoted over the base: ..."}
    metrics = {"challenger": card(3.7)}
    fake_bundle(out, "run-a", 3.7, "a" * 64)
    promote(out, "run-a")
    record(out, release_entry("run-a", "a" * 64, verdict, metrics, None))
    fake_bundle(out, "run-b", 3.9, "b" * 64)
    record(out, release_entry("run-b", "b" * 64, {**verdict, "promoted": False}, metrics, None))
    assert champion_bundle(out).name == "run-a"  # a rejected run never moves latest
    assert last_trained_data(out) == "b" * 64  # ... but it was trained: the watcher must not retrain it
    fake_bundle(out, "run-c", 3.6, "c" * 64)
    promote(out, "run-c")
    entry = rollback(out, "run-a")
    assert champion_bundle(out).name == "run-a" and entry["verdict"] == "rolled back"
    assert entry["reason"] == "rolled back from run-c" and entry["golden_loss"] == 3.7  # run-a's numbers
    assert [e["verdict"] for e in read_log(out)] == ["promoted", "rejected", "rolled back"]
    with pytest.raises(FileNotFoundError, match="no complete bundle .*run-x.*releases: run-a, run-b, run-a"):
        rollback(out, "run-x")


def test_best_checkpoint_is_kept_when_the_last_epoch_is_worse(tmp_path, base_model_dir, tokenizer):
    """A learning rate far too high for this tiny set: the held-out loss falls, then rises. The adapter that training
    returns is the checkpoint with the lowest held-out loss, and its loss on the held-out rows is that minimum."""
    from personatune.config import FinetuneConfig
    from personatune.data import build_dataset
    from personatune.evaluate import mean_loss
    from personatune.model import build_model, load_qlora_model
    from personatune.tokenization import load_tokenized, tokenize_dataset
    from personatune.train import run_training
    from tests.conftest import QUOTES, write_csv

    import csv

    source = list(csv.reader(open(QUOTES)))[1:33]
    csv_path = write_csv(tmp_path / "quotes.csv", source)
    cfg = FinetuneConfig(quotes_csv=str(csv_path), eval_fraction=0.25, epochs=4, learning_rate=3e-2,
                         warmup_ratio=0.0, micro_batch_size=4, grad_accum=2, lora_dropout=0.0)
    ds = build_dataset(csv_path, cfg.eval_fraction, tmp_path / "ds")
    tok_dir = tokenize_dataset(ds, tokenizer, cfg.max_seq_len, "reject", tmp_path / "tok")
    init = build_model(base_model_dir, cfg, tmp_path / "init")
    adapter = run_training(cfg, base_model_dir, init / "adapter", tok_dir, tmp_path / "adapter")
    history = json.loads((adapter / "history.json").read_text())
    curve = [e["eval_loss"] for e in history["eval_loss"]]
    assert len(curve) == 4 and curve[-1] > min(curve), curve  # the case under test: the last epoch is worse
    best = history["eval_loss"][curve.index(min(curve))]
    assert history["best_step"] == best["step"] < history["global_step"]
    assert history["best_eval_loss"] == pytest.approx(min(curve))
    model = load_qlora_model(base_model_dir, cfg, adapter_dir=str(adapter), trainable=False)
    held_out = load_tokenized(tok_dir)["eval"]
    kept = mean_loss(model, held_out, tokenizer)  # per response token; the Trainer's is a mean of batch means
    assert kept < curve[-1] * 0.99 and kept == pytest.approx(min(curve), rel=0.03)


@pytest.mark.parametrize("settings, measured", [
    ({}, False),  # one epoch (the default): one measurement, at the last step: nothing to choose
    ({"epochs": 2}, True),  # once an epoch: two to choose from
    ({"max_steps": 4, "eval_every_steps": 2}, True),
    ({"max_steps": 4, "eval_every_steps": 3}, True),  # steps 3 and 4
    ({"max_steps": 4, "eval_every_steps": 4}, False),
])
def test_training_measures_the_held_out_loss_only_when_there_is_a_checkpoint_to_choose(tmp_path, settings, measured):
    from personatune.config import FinetuneConfig
    from personatune.train import training_arguments

    args = training_arguments(FinetuneConfig(**settings), tmp_path, 100, held_out=True)  # 100 rows: 7 steps an epoch
    assert (args.eval_strategy == "steps") is measured and args.load_best_model_at_end is measured
    assert args.save_strategy == "steps"  # checkpoints to resume from are written either way
    assert not training_arguments(FinetuneConfig(epochs=2), tmp_path, 100, held_out=False).load_best_model_at_end
