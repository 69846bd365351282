"""Export: merged weights, f16/q8_0 GGUF (llama.cpp's converter) and the Ollama Modelfile, on a tuned embedded model.

One tiny QLoRA run (a few steps on the shipped quotes) is exported once per module; each test checks one output.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from tests.conftest import QUOTES, ROOT

PROBES = 32  # the first 32 of data/probes.csv: one generation batch (~10 s a model on the 2-core CPU)
REPLY_TOKENS = 48


@pytest.fixture(scope="module")
def tuned_bundle(tmp_path_factory, base_model_dir, tokenizer):
    """A bundle as write_bundle leaves it (adapter, tokenizer, training_config.json, generation_config.json,
    data_rows.json) from 8 QLoRA steps at the default learning rate, exported to merged, gguf and ollama."""
    from personatune.config import FinetuneConfig
    from personatune.data import build_dataset, load_quotes
    from personatune.decoding import Decoding, generation_config
    from personatune.export import export_bundle
    from personatune.model import build_model
    from personatune.tokenization import tokenize_dataset
    from personatune.train import run_training

    work = tmp_path_factory.mktemp("export")
    cfg = FinetuneConfig(quotes_csv=str(QUOTES), max_steps=8, micro_batch_size=4, grad_accum=1, compute_dtype="fp32")
    ds = build_dataset(QUOTES, cfg.eval_fraction, work / "dataset")
    tokenized = tokenize_dataset(ds, tokenizer, cfg.max_seq_len, cfg.on_long_row, work / "tokens")
    init = build_model(base_model_dir, cfg, work / "init")
    adapter = run_training(cfg, base_model_dir, init / "adapter", tokenized, work / "adapter")
    bundle = work / "bundle"
    shutil.copytree(adapter, bundle)
    (bundle / "training_config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    rows = load_quotes(QUOTES)
    (bundle / "data_rows.json").write_text(json.dumps(rows[["instruction", "user", "response"]].to_dict("records")))
    generation_config(tokenizer, Decoding.from_config(cfg)).save_pretrained(bundle)
    done = export_bundle(bundle, "ollama", base_model=base_model_dir)
    return bundle, done


def probe_prompts(n: int = PROBES) -> list[tuple[str, str]]:
    from personatune.evaluate import load_eval_rows

    return [(r["instruction"], r["user"]) for r in load_eval_rows(ROOT / "data" / "probes.csv")[:n]]


def greedy(model, tok, bundle, prompts) -> list[str]:
    import dataclasses

    from personatune.decoding import load_decoding
    from personatune.evaluate import generate_replies

    # the merged model has no base to contrast with: both decode without it (the weights are what is compared)
    decoding = dataclasses.replace(load_decoding(bundle).without_contrast(), max_new_tokens=REPLY_TOKENS)
    return [r["reply"] for r in generate_replies(model, tok, prompts, decoding)]


@pytest.fixture(scope="module")
def merged(tuned_bundle):
    from transformers import AutoModelForCausalLM

    bundle, _ = tuned_bundle
    return AutoModelForCausalLM.from_pretrained(bundle / "merged", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def merged_replies(tuned_bundle, merged, tokenizer):
    return greedy(merged, tokenizer, tuned_bundle[0], probe_prompts())


def test_export_writes_every_output_into_the_bundle(tuned_bundle):
    bundle, done = tuned_bundle
    assert set(done) == {"merged", "gguf", "ollama"}
    assert {p.name for p in (bundle / "merged").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json",
                                                              "generation_config.json", ".complete"}
    assert sorted(p.name for p in (bundle / "gguf").glob("*.gguf")) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert (bundle / "Modelfile").is_file()
    assert not list(bundle.glob(".tmp-*")) and not list(bundle.glob(".Modelfile*"))
    # the merged model decodes as the evaluation measured: the bundle's generation_config.json, not the base's
    # (less the contrast with the base, which a merged model cannot do)
    gen = json.loads((bundle / "merged" / "generation_config.json").read_text())
    stored = json.loads((bundle / "generation_config.json").read_text())
    assert stored.pop("base_contrast") == 0.7 and gen == stored
    assert gen["repetition_penalty"] == 1.15 and gen["stop_strings"] == ["###"]
    # a second export keeps what is complete (a retried task redoes nothing)
    stamp = (bundle / "gguf" / "model-f16.gguf").stat().st_mtime_ns
    from personatune.export import export_bundle

    export_bundle(bundle, "gguf")
    assert (bundle / "gguf" / "model-f16.gguf").stat().st_mtime_ns == stamp


def test_merged_logits_equal_base_plus_adapter(tuned_bundle, merged, merged_replies, base_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from personatune.prompt import format_prompt

    bundle, _ = tuned_bundle
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(bundle)).eval()
    prompts = probe_prompts(8)
    batch = tokenizer([format_prompt(i, u) for i, u in prompts], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = unmerged(**batch).logits
        got = merged(**batch).logits
        with unmerged.disable_adapter():
            plain = unmerged(**batch).logits
    mask = batch["attention_mask"].bool()
    rel = ((got - want)[mask].abs().max() / want[mask].abs().max()).item()
    moved = ((plain - want)[mask].abs().max() / want[mask].abs().max()).item()
    print(f"\nmerged vs base+adapter logits: max rel diff {rel:.2e} (the adapter itself moves them {moved:.2e})")
    assert rel < 1e-4
    assert moved > 1e-2  # the trained adapter matters: equal logits are not the base's twice
    assert greedy(unmerged, tokenizer, bundle, probe_prompts()) == merged_replies


def test_f16_gguf_reads_back_and_replies_like_the_merged_model(tuned_bundle, merged_replies, tokenizer):
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundle, _ = tuned_bundle
    folder = bundle / "gguf"
    reader = GGUFReader(folder / "model-f16.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert len(types) == 272  # 30 layers x 9 + embeddings + final norm (tied output)
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16
    # what llama.cpp tokenizes with: SmolLM2's pre-tokenizer recognised, BOS added exactly as in training (not at all)
    meta = {k: reader.fields[k].contents() for k in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                                                        "tokenizer.ggml.eos_token_id")}
    adds_bos = tokenizer("### User:")["input_ids"][0] == tokenizer.bos_token_id
    assert meta == {"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": adds_bos,
                    "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id}
    q8 = {t.name: t.tensor_type for t in GGUFReader(folder / "model-q8_0.gguf").tensors}
    assert q8["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0

    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file="model-f16.gguf")
    from personatune.prompt import format_prompt

    for instruction, user in probe_prompts(8):  # the GGUF's own vocabulary encodes the prompt as training did
        text = format_prompt(instruction, user)
        assert gguf_tok(text)["input_ids"] == tokenizer(text)["input_ids"]

    f16 = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    f16_replies = greedy(f16, tokenizer, bundle, probe_prompts())
    del f16
    q8_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-q8_0.gguf", dtype=torch.float32).eval()
    q8_replies = greedy(q8_model, tokenizer, bundle, probe_prompts())
    agree = sum(a == b for a, b in zip(q8_replies, merged_replies)) / len(merged_replies)
    print(f"\nGGUF greedy replies on {PROBES} probes: f16 equal to merged "
          f"{sum(a == b for a, b in zip(f16_replies, merged_replies))}/{PROBES}; q8_0 agreement {agree:.0%}")
    assert f16_replies == merged_replies
    assert all(merged_replies)  # real replies, not empty strings agreeing with each other
    # q8_0 is reported, not required equal: one flipped token mid-reply changes the rest (measured 13/32 equal,
    # 2026-11-29); a broken quantization agrees on none
    assert agree >= 0.25


def test_modelfile_renders_the_training_prompt(tuned_bundle):
    from personatune.export import fill_template
    from personatune.prompt import format_prompt

    bundle, _ = tuned_bundle
    text = (bundle / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./gguf/model-f16.gguf" in lines and (bundle / "gguf" / "model-f16.gguf").is_file()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for instruction, user in probe_prompts(8):
        assert fill_template(template, instruction, user) == format_prompt(instruction, user)
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0]
    counts = Counter(r["instruction"] for r in json.loads((bundle / "data_rows.json").read_text()))
    assert counts[system] == max(counts.values()) == 59  # the default instruction: one that most rows trained on
    for wanted in ('PARAMETER stop "###"', "PARAMETER temperature 0", "PARAMETER repeat_penalty 1.15",
                   "PARAMETER repeat_last_n -1", "PARAMETER num_predict 64"):
        assert wanted in lines, wanted
    assert any(line.startswith("# base_contrast 0.7 ") for line in lines)  # Ollama decodes without it: said so


def test_chat_format_modelfile_is_chatml_and_other_templates_are_refused(tokenizer):
    import copy

    from personatune.decoding import Decoding
    from personatune.export import ExportError, fill_template, modelfile_template, render_modelfile

    template, stops = modelfile_template("chat", tokenizer)
    system, user = "Respond as Wednesday Addams.", "Do you like birthdays?"
    want = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)
    assert fill_template(template, system, user) == want
    assert stops == ["<|im_end|>", "<|im_start|>"]
    text = render_modelfile("./gguf/model-f16.gguf", "chat", Decoding(), system, tokenizer)
    assert 'PARAMETER stop "<|im_end|>"' in text and "repeat_penalty" not in text

    llama2 = copy.deepcopy(tokenizer)
    llama2.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
                            "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}")
    with pytest.raises(ExportError, match="not ChatML"):
        modelfile_template("chat", llama2)
    with pytest.raises(ExportError, match="prompt_format"):
        modelfile_template("alpaca", tokenizer)


def test_export_formats_imply_what_they_are_built_from():
    from personatune.export import ExportError, parse_formats

    assert parse_formats("") == []
    assert parse_formats("merged") == ["merged"]
    assert parse_formats("gguf") == ["merged", "gguf"]
    assert parse_formats(" ollama , merged") == ["merged", "gguf", "ollama"]
    with pytest.raises(ExportError, match="'onnx'"):
        parse_formats("merged,onnx")


def test_export_command_adds_the_exports_to_the_hub_repo_in_one_commit(tuned_bundle, tmp_path, monkeypatch):
    """`python -m flows.export --hub-repo` with the real huggingface_hub client and the Hub-protocol server. The
    server keeps files in memory, so the bundle travels without its two big weight files (merged safetensors,
    GGUFs): the paths and the one commit are what is checked here. No capsys: the command imports Prefect, whose
    console log handler would keep the captured stream after the test closed it (the next flow's logs then fail)."""
    import secrets

    import huggingface_hub.constants

    from flows.export import main
    from tests.hub_server import HubServer

    bundle, _ = tuned_bundle
    small = tmp_path / "bundle"
    shutil.copytree(bundle, small, ignore=shutil.ignore_patterns("model.safetensors", "*.gguf"))
    (small / "Modelfile").unlink()
    token = "hf_test_" + secrets.token_hex(8)
    with HubServer(tokens={token: "you"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", token)
        assert main(["--adapter", str(small), "--format", "ollama", "--hub-repo", "you/wednesday-adapter"]) == 0
        repo = hub.repos["you/wednesday-adapter"]
        head = repo.resolve("main")
    assert all(token.encode() not in data for data in head.files.values()) and token not in head.description
    assert (small / "Modelfile").is_file()  # the exports that were complete are kept, the Modelfile written
    assert head.files["Modelfile"] == (small / "Modelfile").read_bytes()
    assert {"merged/config.json", "merged/generation_config.json", "merged/tokenizer.json"} <= set(head.files)
    assert not any(name.endswith(".complete") for name in head.files)
    assert head.summary == "Export Modelfile, merged" and len(repo.commits) == 2  # the repo's first commit + this
