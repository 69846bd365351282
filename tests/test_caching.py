"""Stage cache keys: each stage hashes the ML-core code it runs (its modules and their imports), not all of it."""
from __future__ import annotations

from personatune.files import code_version, module_closure
from tasks.caching import STAGE_FIELDS, STAGE_MODULES, stage_key


def test_each_stage_hashes_the_modules_it_runs_and_what_they_import():
    closure = {stage: module_closure(*mods) for stage, mods in STAGE_MODULES.items()}
    assert {"__init__", "config", "data", "files"} <= closure["validate"]
    assert not {"train", "plan", "speedups", "evaluate", "model", "tokenization"} & closure["validate"]
    assert {"tokenization", "prompt", "data"} <= closure["tokenize"] and "train" not in closure["tokenize"]
    assert {"train", "plan", "speedups", "model", "distributed", "train_rank", "tokenization"} <= closure["train"]
    assert not {"evaluate", "metrics", "hub"} & closure["train"]   # an evaluation edit keeps the trained adapter
    assert {"evaluate", "metrics", "model"} <= closure["evaluate"]
    assert "hub" not in set().union(*closure.values())              # publishing is not a cached stage


def test_code_version_of_a_subset_differs_from_the_whole_and_is_stable():
    assert code_version("personatune.data") == code_version("personatune.data")
    assert code_version("personatune.data") != code_version()
    assert code_version("personatune.train") != code_version("personatune.evaluate")


def test_stage_key_depends_on_the_stages_settings_only():
    config = {"output_dir": "out", **{f: 1 for fields in STAGE_FIELDS.values() for f in fields}}
    params = {"config": config, "out_dir": "x", "dataset_dir": "d"}
    key = stage_key("train", params)
    assert stage_key("train", {**params, "out_dir": "elsewhere"}) == key
    assert stage_key("train", {**params, "config": {**config, "compile": 0}}) != key      # a train setting
    assert stage_key("train", {**params, "config": {**config, "num_samples": 0}}) == key  # an evaluate setting
    assert stage_key("evaluate", params) != key


def test_scores_are_keyed_by_the_adapter_content_and_the_decoding():
    """The champion's scores from its own run are a cache hit wherever its bundle lies; a new decoding re-scores."""
    config = {f: 1 for fields in STAGE_FIELDS.values() for f in fields}
    params = {"config": config, "adapter_dir": "/outputs/run-a", "adapter_sha256": "aa", "eval_sha256": {"golden": "g"}}
    key = stage_key("score", params)
    assert stage_key("score", {**params, "adapter_dir": "/outputs/latest"}) == key
    assert stage_key("score", {**params, "adapter_sha256": "bb"}) != key
    assert stage_key("score", {**params, "eval_sha256": {"golden": "h"}}) != key
    assert stage_key("score", {**params, "config": {**config, "repetition_penalty": 1.2}}) != key
    assert stage_key("score", {**params, "config": {**config, "reply_samples": 3}}) != key  # replies averaged
    assert stage_key("score", {**params, "config": {**config, "learning_rate": 9}}) == key  # training settings
    from personatune.evaluate import EvaluationModels

    # the loaded base shared by the evaluation stages saves loads and changes no output: not part of any key
    assert stage_key("score", {**params, "models": EvaluationModels()}) == key
    assert stage_key("evaluate", {**params, "models": EvaluationModels()}) == stage_key("evaluate", params)
    train = {"config": config, "dataset_dir": "d"}
    for setting in ("neftune_noise_alpha", "eval_every_steps", "early_stopping_patience"):
        assert stage_key("train", {**train, "config": {**config, setting: 0}}) != stage_key("train", train)


def test_prompt_format_and_lora_targets_key_every_stage_they_change():
    """A new prompt format re-tokenizes, retrains (its chat_template.jinja differs), re-scores and re-evaluates; new
    LoRA targets rebuild the model and retrain; validation is untouched by either."""
    config = {"output_dir": "out", **{f: 1 for fields in STAGE_FIELDS.values() for f in fields}}
    params = {"config": config, "dataset_dir": "d"}
    for setting, stages in (("prompt_format", ("tokenize", "train", "score", "evaluate")),
                            ("lora_targets", ("build_model", "train", "evaluate"))):
        changed = {**params, "config": {**config, setting: "other"}}
        assert {s for s in STAGE_FIELDS if stage_key(s, changed) != stage_key(s, params)} == set(stages), setting
