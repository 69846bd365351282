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
    """The NF4 weights are dequantized first (fp32 math throughout): bitsandbytes' CPU 4-bit kernel rounds
    differently for different batch shapes on some CPUs (3e-4 relative seen on AVX-512), which is not packing."""
    from personatune.model import dequantize_frozen_base

    cfg = FinetuneConfig(compute_dtype="fp32", lora_dropout=0.0)
    model = load_qlora_model(base_model_dir, cfg, trainable=False)
    dequantize_frozen_base(model)
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


def test_dequantized_base_gives_the_4bit_logits_before_or_after_a_forward_pass(base_model_dir, tokenizer):
    """CPU inference and training swap the 4-bit layers for plain ones holding the NF4 values. On an AVX-512 CPU
    bitsandbytes repacks each weight for its kernel on the first forward pass (block scales kept in bf16); the swap
    must read that layout too (it once read it as the original layout: garbage logits). Fresh, the swap holds
    exactly the values bitsandbytes dequantizes; after a pass, the codes exactly and the scales to bf16 precision."""
    from personatune.model import dequantize_frozen_base

    batch = tokenizer(["### Instruction:\nBe grim.\n\n### User:\nHello\n\n### Response:\n"], return_tensors="pt")
    fresh = load_qlora_model(base_model_dir, FinetuneConfig(), trainable=False)
    assert dequantize_frozen_base(fresh) == 30 * 7  # every q,k,v,o,gate,up,down projection of 30 layers
    used = load_qlora_model(base_model_dir, FinetuneConfig(), trainable=False)
    with torch.no_grad():
        four_bit = used(**batch).logits  # the first pass (repacks the weights where the CPU kernel wants it)
        dequantize_frozen_base(used)
        after = used(**batch).logits
        plain = fresh(**batch).logits
    weights = lambda m: {n: p for n, p in m.named_parameters() if "proj.base_layer" in n or "proj.weight" in n}  # noqa: E731
    assert weights(used).keys() == weights(fresh).keys() and len(weights(fresh)) == 30 * 7
    for name, w in weights(fresh).items():  # bf16 scales: within 1% of the weight's range, never another layout
        assert (weights(used)[name] - w).abs().max() <= 0.01 * w.abs().max(), name

    def same_model(a, b):  # the next-token choice almost everywhere, logits within a few hundredths on average
        return (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9 and (a - b).abs().mean() < 0.1

    assert same_model(after, plain) and same_model(four_bit, plain)
