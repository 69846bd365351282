"""Training profiles: the layout they choose for a card, and that the GPU profile's model changes keep the loss."""
from __future__ import annotations

import pytest
import torch

from personatune.config import ConfigError, FinetuneConfig
from personatune.model import load_qlora_model
from personatune.profiles import (ModelShape, TrainPlan, apply_plan, chunked_causal_lm_loss, estimate_peak_gib,
                                  plan_training)
from personatune.tokenization import IGNORE_INDEX, encode_example
from personatune.train import collator, training_arguments

LLAMA_7B = ModelShape(hidden=4096, layers=32, intermediate=11008, vocab=49152)
LENGTHS = [40 + (i * 7) % 41 for i in range(300)]  # 40..80 tokens, like data/quotes.csv


def test_cpu_auto_keeps_the_config_as_given():
    cfg = FinetuneConfig()
    plan = plan_training(cfg, cuda=False)
    assert plan.profile == "manual" and (plan.micro_batch_size, plan.grad_accum) == (cfg.micro_batch_size, cfg.grad_accum)
    assert plan.attention == "sdpa" and not plan.lean_head


@pytest.mark.parametrize("card", [24, 40, 80, 141])
def test_gpu_profile_keeps_the_recipe_and_fits_the_card(card):
    cfg = FinetuneConfig(profile="auto")
    plan = plan_training(cfg, LLAMA_7B, LENGTHS, memory_gib=card, cuda=True)
    assert plan.profile == "gpu" and plan.packing and plan.attention == "varlen"
    assert plan.micro_batch_size * plan.grad_accum == cfg.micro_batch_size * cfg.grad_accum  # same examples per step
    assert plan.estimated_peak_gib <= 0.92 * card
    if card >= 40:
        assert (plan.micro_batch_size, plan.checkpoint_layers) == (16, 0)


def test_smaller_card_checkpoints_more_never_less():
    cfg = FinetuneConfig(profile="gpu")
    ckpt = [plan_training(cfg, LLAMA_7B, [200] * 300, memory_gib=m, cuda=True).checkpoint_layers for m in (80, 24, 16, 10)]
    assert ckpt == sorted(ckpt) and ckpt[0] == 0 and ckpt[-1] > 0


def test_low_memory_profile_checkpoints_everything_and_splits_only_on_small_cards():
    cfg = FinetuneConfig(profile="low-memory")
    plan = plan_training(cfg, LLAMA_7B, LENGTHS, memory_gib=80, cuda=True)
    assert plan.checkpoint_layers == LLAMA_7B.layers and plan.lean_head and plan.loss_chunk_tokens <= 256
    assert (plan.micro_batch_size, plan.grad_accum) == (16, 1)
    seed = estimate_peak_gib(LLAMA_7B, 4 * max(LENGTHS), LLAMA_7B.layers, lean_head=False)
    assert plan.estimated_peak_gib <= seed + 0.5  # measured below the seed recipe (BENCHMARKS.md)
    small = plan_training(cfg, LLAMA_7B, [250] * 300, memory_gib=6, cuda=True)
    assert small.micro_batch_size < 16 and small.micro_batch_size * small.grad_accum == 16


def test_profile_is_validated():
    with pytest.raises(ConfigError, match="profile"):
        FinetuneConfig(profile="fast")


def test_trainer_does_not_checkpoint_every_layer_under_a_gpu_plan(tmp_path):
    cfg = FinetuneConfig(gradient_checkpointing=True)
    plan = TrainPlan("gpu", 16, 1, True, 4, 32, "varlen", True, None, None, "test")
    assert not training_arguments(cfg, tmp_path, 100, plan).gradient_checkpointing
    assert training_arguments(cfg, tmp_path, 100).gradient_checkpointing


def test_chunked_loss_equals_full_loss_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(1, 50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, dtype=torch.float64)
    labels = torch.randint(0, 97, (1, 50))
    labels[0, :10] = IGNORE_INDEX
    from transformers.loss.loss_utils import ForCausalLMLoss

    full = ForCausalLMLoss(hidden @ weight.T, labels, 97, num_items_in_batch=torch.tensor(33))
    (g_full,) = torch.autograd.grad(full, hidden)
    chunked = chunked_causal_lm_loss(hidden, labels, weight, torch.tensor(33), chunk=7)
    (g_chunk,) = torch.autograd.grad(chunked, hidden)
    assert torch.allclose(full.double(), chunked.double(), rtol=1e-6)
    assert torch.allclose(g_full, g_chunk, rtol=1e-6, atol=1e-9)
    mean = chunked_causal_lm_loss(hidden, labels, weight, chunk=8)
    assert torch.allclose(mean.double(), ForCausalLMLoss(hidden @ weight.T, labels, 97).double(), rtol=1e-6)


def test_varlen_collator_marks_example_boundaries(tokenizer):
    rows = [("Be grim.", "Hi?", "No."), ("Be grim.", "Why?", "Because the void said so.")]
    feats = [dict(zip(("input_ids", "labels"), encode_example(tokenizer, *r))) for r in rows]
    batch = collator(tokenizer, packing=True, varlen=True)(feats)
    n0, n1 = (len(f["input_ids"]) for f in feats)
    assert batch["cu_seq_lens_q"].tolist() == [0, n0, n0 + n1] and batch["max_length_q"] == max(n0, n1)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, n0]


def test_gpu_plan_model_gives_the_padded_loss_in_fp32(base_model_dir, tokenizer):
    """apply_plan (lean head + chunked loss; varlen falls back to SDPA on CPU) on packed rows == stock padded loss."""
    from tests.test_packing import features

    cfg = FinetuneConfig(compute_dtype="fp32", lora_dropout=0.0)
    model = load_qlora_model(base_model_dir, cfg, trainable=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    feats = features(tokenizer)
    with torch.no_grad():
        model.eval()
        loss_padded = model(**collator(tokenizer, packing=False)(feats)).loss.item()
        plan = TrainPlan("gpu", 3, 1, True, 0, 30, "varlen", True, None, None, "test")
        apply_plan(model, plan, torch.float32)
        model.train()  # the lean head defers to the chunked loss only while training
        packed = collator(tokenizer, packing=True, varlen=True)([{k: v for k, v in f.items() if k != "attention_mask"} for f in feats])
        loss_plan = model(**packed).loss.item()
    assert abs(loss_plan - loss_padded) / loss_padded < 1e-4, (loss_plan, loss_padded)
