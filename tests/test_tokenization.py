"""The scaffold, response-only labels, EOS, pad = EOS, and long-row handling."""
from __future__ import annotations

import json

import pytest

from personatune.data import DataValidationError, build_dataset
from personatune.prompt import cut_reply, format_prompt
from personatune.tokenization import IGNORE_INDEX, encode_example, load_tokenized, tokenize_dataset
from tests.conftest import write_csv


def test_scaffold_is_exact():
    assert format_prompt(" Be grim. ", "Hi there") == "### Instruction:\nBe grim.\n\n### User:\nHi there\n\n### Response:\n"
    assert cut_reply(" Dust to dust.\n\n### User:\nagain") == "Dust to dust."


def test_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None


def test_prompt_tokens_masked_response_tokens_kept(tokenizer):
    instruction, user, response = "Be grim.", "How are you?", "Decomposing gracefully, thank you."
    ids, labels = encode_example(tokenizer, instruction, user, response)
    prompt_len = len(tokenizer(format_prompt(instruction, user))["input_ids"])
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(labels) == prompt_len + len(response_ids) + 1
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len          # every prompt token masked
    assert labels[prompt_len:] == ids[prompt_len:] == response_ids + [tokenizer.eos_token_id]  # none of the reply
    assert tokenizer.decode(ids[prompt_len:-1]) == response


def test_tokenized_dataset_on_disk(tmp_path, tokenizer, good_rows):
    ds_dir = build_dataset(write_csv(tmp_path / "q.csv", good_rows), 0.2, tmp_path / "ds")
    out = tokenize_dataset(ds_dir, tokenizer, 256, "reject", tmp_path / "tok")
    data = load_tokenized(out)
    assert set(data["train"].column_names) == {"input_ids", "attention_mask", "labels"}
    row = data["train"][0]
    assert row["input_ids"][-1] == tokenizer.eos_token_id and row["labels"][-1] == tokenizer.eos_token_id
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["rows"] + stats["eval"]["rows"] == len(good_rows)
    assert 0 < stats["train"]["response_tokens"] < stats["train"]["tokens"]


def test_long_rows_rejected_or_truncated_never_silently(tmp_path, tokenizer, good_rows):
    good_rows[3][2] = "Graves. " * 80
    ds_dir = build_dataset(write_csv(tmp_path / "q.csv", good_rows), 0.2, tmp_path / "ds")
    with pytest.raises(DataValidationError) as err:
        tokenize_dataset(ds_dir, tokenizer, 64, "reject", tmp_path / "tok", quotes_csv="q.csv")
    assert [(p.line, p.column) for p in err.value.problems] == [(5, "response")]
    assert "max_seq_len=64" in str(err.value) and not (tmp_path / "tok").exists()

    out = tokenize_dataset(ds_dir, tokenizer, 64, "truncate", tmp_path / "tok")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["truncated_lines"] + stats["eval"]["truncated_lines"] == [5]
    assert max(stats["train"]["max_len"], stats["eval"]["max_len"]) == 64
