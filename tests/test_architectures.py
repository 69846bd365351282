"""LoRA targets per architecture: 'auto' is peft's default for the model type (q_proj,v_proj on Llama, c_attn on
GPT-2); a configured module the model lacks is an error that lists the modules it has. A GPT-2-architecture base
(tiny, random, built here) trains through the whole flow on its resolved targets."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from personatune.config import ConfigError, FinetuneConfig
from personatune.model import adaptable_modules, resolve_lora_targets
from tests.conftest import TINY_EVAL_SETS, write_csv


def tiny_gpt2(tokenizer):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config)


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))


def test_auto_targets_are_the_model_types_default_and_missing_ones_are_named(tokenizer):
    gpt2, llama = tiny_gpt2(tokenizer), tiny_llama(tokenizer)
    assert adaptable_modules(gpt2) == ["c_attn", "c_fc", "c_proj"]
    assert resolve_lora_targets(gpt2, FinetuneConfig().lora_target_modules) == ["c_attn"]
    assert resolve_lora_targets(llama, FinetuneConfig().lora_target_modules) == ["q_proj", "v_proj"]
    assert resolve_lora_targets(gpt2, "all-linear") == "all-linear"
    assert resolve_lora_targets(gpt2, FinetuneConfig(lora_targets="c_attn,c_fc").lora_target_modules) == ["c_attn", "c_fc"]
    with pytest.raises(ConfigError, match=r"lora_targets: q_proj, v_proj not found in the gpt2 base model; its "
                                          r"linear modules are: c_attn, c_fc, c_proj \(or use auto or all-linear\)"):
        resolve_lora_targets(gpt2, ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="c_attn not found in the llama base model; its linear modules are: "
                                          "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        resolve_lora_targets(llama, ["q_proj", "c_attn"])  # one missing is enough (peft would skip it silently)


@pytest.fixture(scope="module")
def gpt2_run(prefect_env, tmp_path_factory, tokenizer):
    from flows.finetune import finetune

    work = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(tokenizer).save_pretrained(work / "gpt2-tiny")
    tokenizer.save_pretrained(work / "gpt2-tiny")
    quotes = write_csv(work / "quotes.csv", [["Respond as Wednesday Addams.", f"Question {i} about the weather?",
                                               f"Day {i} will be bleak, like everything I enjoy."] for i in range(40)])
    params = dict(base_model=str(work / "gpt2-tiny"), quotes_csv=str(quotes), output_dir=str(work / "outputs"),
                  max_steps=3, micro_batch_size=4, grad_accum=1, learning_rate=1e-2, num_samples=1, max_new_tokens=8,
                  eval_fraction=0.2, force_promote=True, persona_similarity=False, **TINY_EVAL_SETS)
    return params, finetune(**params)


def test_gpt2_trains_through_the_flow_on_c_attn(gpt2_run):
    params, summary = gpt2_run
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]
    stage_dirs = json.loads((run_dir / "training_config.json").read_text())["stage_dirs"]
    assert json.loads((Path(stage_dirs["model"]) / "model.json").read_text())["lora_targets"] == ["c_attn"]
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["training"]["steps"] == 3 and ev["eval_loss"]["tuned"] != ev["eval_loss"]["base"]
    # the scaffold bundle's chat template renders the scaffold
    from personatune.prompt import SCAFFOLD_CHAT_TEMPLATE

    assert (run_dir / "chat_template.jinja").read_text() == SCAFFOLD_CHAT_TEMPLATE


def test_flows_chat_prompts_a_scaffold_adapter_with_the_scaffold(gpt2_run, tokenizer, capsys):
    from flows.chat import main
    from personatune.decoding import load_decoding
    from personatune.evaluate import generate_reply
    from personatune.inference import load_for_inference

    _, summary = gpt2_run
    run_dir = summary["run_dir"]
    assert main(["--adapter", run_dir, "--max-new-tokens", "8", "--prompt", "Do you like sunny days?"]) == 0
    out, err = capsys.readouterr()
    assert "prompt format: scaffold" in err
    model, tok, _ = load_for_inference(run_dir)
    decoding = dataclasses.replace(load_decoding(run_dir), max_new_tokens=8)  # what flows.chat decodes with
    ours = generate_reply(model, tok, "Respond as Wednesday Addams: deadpan and morbid.", "Do you like sunny days?",
                          decoding)
    assert out.strip() == ours["reply"]


def test_a_missing_target_fails_the_build_stage_naming_what_exists(gpt2_run):
    from flows.finetune import finetune

    params, _ = gpt2_run
    with pytest.raises(Exception, match="q_proj not found in the gpt2 base model; its linear modules are: c_attn"):
        finetune(**{**params, "lora_targets": "q_proj"})
