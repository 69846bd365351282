"""One config: CLI flags, config files and flow parameters share names, defaults and validation."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields

import pytest

from personatune.config import ConfigError, FinetuneConfig, add_config_arguments, config_from_args, from_mapping
from tests.conftest import ROOT


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_are_the_recipe():
    cfg = FinetuneConfig()
    # lora_targets 'auto' is peft's default for the model type: q_proj,v_proj (the seed's) on Llama-type bases,
    # what the embedded model is (tests/test_architectures.py checks the resolved targets)
    assert (cfg.lora_r, cfg.lora_targets, cfg.optim, cfg.grad_accum) == (8, "auto", "paged_adamw_8bit", 4)
    assert cfg.load_in_4bit and cfg.lora_target_modules is None and cfg.prompt_format == "scaffold"
    assert FinetuneConfig(lora_targets="q_proj, v_proj").lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="prompt_format must be scaffold or chat, got 'chatml'"):
        from_mapping({"prompt_format": "chatml"})


def test_prompt_format_has_one_name_in_flags_file_and_parameters(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("prompt_format: chat\n")
    assert parse(["--prompt-format", "chat"]).prompt_format == parse(["--config", str(conf)]).prompt_format == "chat"
    assert parse(["--config", str(conf), "--prompt-format", "scaffold"]).prompt_format == "scaffold"
    assert from_mapping({"prompt_format": "chat"}).to_dict()["prompt_format"] == "chat"  # flow / deployment parameter


def test_flags_file_and_precedence(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("lora_r: 16\nlearning_rate: 0.001\nlora_targets: all-linear\n")
    cfg = parse(["--config", str(conf), "--lora-r", "32", "--no-load-in-4bit"])
    assert (cfg.lora_r, cfg.learning_rate, cfg.load_in_4bit) == (32, 0.001, False)
    assert cfg.lora_target_modules == "all-linear"
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"epochs": 1, "seed": 7}))
    assert (parse(["--config", str(js)]).epochs, parse(["--config", str(js)]).seed) == (1.0, 7)


def test_strings_from_ui_or_events_are_coerced_strictly():
    cfg = from_mapping({"lora_r": "16", "load_in_4bit": "false", "learning_rate": "3e-4"})
    assert (cfg.lora_r, cfg.load_in_4bit, cfg.learning_rate) == (16, False, 3e-4)
    with pytest.raises(ConfigError, match="lora_r must be int"):
        from_mapping({"lora_r": "sixteen"})
    with pytest.raises(ConfigError, match="unknown option"):
        from_mapping({"lora_rank": 8})
    with pytest.raises(ConfigError, match="eval_fraction must be in"):
        from_mapping({"eval_fraction": 1.5})


def test_help_documents_every_flag_and_flow_has_same_parameters():
    out = subprocess.run([sys.executable, "-m", "flows.finetune", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    from flows.finetune import finetune

    schema = finetune.parameters.model_dump()["properties"]
    for f in fields(FinetuneConfig):
        assert "--" + f.name.replace("_", "-") in out
        assert schema[f.name]["description"] == f.metadata["help"]
        assert schema[f.name]["default"] == getattr(FinetuneConfig(), f.name)
