"""Padding-free packing computes the same loss as padded batches, and keeps prompt labels masked."""
from __future__ import annotations

import torch

from personatune.config import FinetuneConfig
from personatune.model import load_qlora_model
from personatune.tokenization import IGNORE_INDEX, encode_example
from personatune.train import collator

ROWS = [
    ("Be grim.", "How are you?", "Decomposing gracefully, thank you."),
    ("Give grim advice as Wednesday Addams.", "How do I make friends at a new school?", "Find the quietest person and study them. Friendship is mostly surveillance with snacks."),
    ("Refuse the cheerful request.", "Smile for the photo!", "No."),
]


def features(tok):
    out = []
    for row in ROWS:
        ids, labels = encode_example(tok, *row)
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def test_packed_batch_has_masked_prompts_and_restarting_positions(tokenizer):
    feats = features(tokenizer)
    batch = collator(tokenizer, packing=True)([{k: v for k, v in f.items() if k != "attention_mask"} for f in feats])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, len(feats[0]["input_ids"]), len(feats[0]["input_ids"]) + len(feats[1]["input_ids"])]
    flat_labels = sum((f["labels"] for f in feats), [])
    assert (batch["labels"][0] != IGNORE_INDEX).sum() == sum(v != IGNORE_INDEX for v in flat_labels)


def test_packed_and_padded_losses_match_in_fp32(base_model_dir, tokenizer):
    cfg = FinetuneConfig(compute_dtype="fp32", lora_dropout=0.0)
    model = load_qlora_model(base_model_dir, cfg, trainable=False)
    with torch.no_grad():  # perturb LoRA B so the adapter is active, not the zero-init identity
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    feats = features(tokenizer)
    with torch.no_grad():
        padded = collator(tokenizer, packing=False)(feats)
        loss_padded = model(**padded).loss.item()
        packed = collator(tokenizer, packing=True)([{k: v for k, v in f.items() if k != "attention_mask"} for f in feats])
        loss_packed = model(**packed).loss.item()
    assert abs(loss_packed - loss_padded) / loss_padded < 1e-4, (loss_packed, loss_padded)
    assert 0.5 < loss_padded < 15


def test_dequantized_base_gives_identical_logits(base_model_dir, tokenizer):
    """CPU inference swaps the 4-bit layers for plain ones holding the same NF4 values: nothing changes but speed."""
    from personatune.model import dequantize_frozen_base

    model = load_qlora_model(base_model_dir, FinetuneConfig(), trainable=False)
    batch = tokenizer(["### Instruction:\nBe grim.\n\n### User:\nHello\n\n### Response:\n"], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        assert dequantize_frozen_base(model) == 30 * 7  # every q,k,v,o,gate,up,down projection of 30 layers
        after = model(**batch).logits
    assert torch.equal(before, after)
