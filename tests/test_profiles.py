"""Training plans (personatune.plan, pure): the layout they choose for a card and how they back off after an
out-of-memory error; and that the speed-ups (personatune.speedups) that carry out a GPU plan keep the loss."""
from __future__ import annotations

import pytest
import torch

from personatune.config import ConfigError, FinetuneConfig
from personatune.model import load_qlora_model
import functools

from personatune import plan as plan_module
from personatune.plan import COMPILE_MIN_STEPS, ModelShape, TrainPlan, estimate_peak_gib
from personatune.speedups import apply_plan, chunked_causal_lm_loss
from personatune.tokenization import IGNORE_INDEX, encode_example
from personatune.train import collator, training_arguments

LLAMA_7B = ModelShape(hidden=4096, layers=32, intermediate=11008, vocab=49152)
LENGTHS = [40 + (i * 7) % 41 for i in range(300)]  # 40..80 tokens, like data/quotes.csv
# The layout tests plan a run long enough to repay compiling (COMPILE_MIN_STEPS); test_short_runs_are_not_compiled
# checks that rule itself.
plan_training = functools.partial(plan_module.plan_training, min_compile_steps=0)


def test_short_runs_are_not_compiled():
    """Compiling costs ~36 s on the 7B (bench/results/flow_h200/): one epoch of 300 rows (19 steps) trains eagerly
    and says why; a run of COMPILE_MIN_STEPS steps compiles; compile=False never does."""
    gpu = FinetuneConfig(profile="gpu")
    short = plan_module.plan_training(gpu, LLAMA_7B, LENGTHS, memory_gib=80, cuda=True)
    assert not short.compile and "not compiled (19 steps" in short.reason
    long = plan_module.plan_training(gpu.replace(max_steps=COMPILE_MIN_STEPS), LLAMA_7B, LENGTHS, memory_gib=80, cuda=True)
    assert long.compile and "not compiled" not in long.reason
    epochs = plan_module.plan_training(gpu.replace(epochs=float(COMPILE_MIN_STEPS)), LLAMA_7B, LENGTHS, memory_gib=80,
                                       cuda=True)
    assert epochs.compile
    assert not plan_module.plan_training(gpu.replace(compile=False, max_steps=COMPILE_MIN_STEPS), LLAMA_7B, LENGTHS,
                                         memory_gib=80, cuda=True).compile


def test_cpu_auto_keeps_the_config_layout_with_the_frozen_weights_dequantized():
    cfg = FinetuneConfig()
    plan = plan_training(cfg, cuda=False)
    assert plan.profile == "cpu" and (plan.micro_batch_size, plan.grad_accum) == (cfg.micro_batch_size, cfg.grad_accum)
    assert plan.attention == "sdpa" and not plan.compile and plan.packing == cfg.packing
    assert plan.dequantized_base  # the NF4 values once, instead of dequantizing them in every pass
    assert plan.lean_head and plan.loss_chunk_tokens == 0  # the head at the reply tokens only, all at once
    assert not plan_training(cfg.replace(load_in_4bit=False), cuda=False).dequantized_base  # nothing to dequantize
    manual = plan_training(cfg.replace(profile="manual"), cuda=False)
    assert manual.profile == "manual" and not manual.dequantized_base


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
    at_once = chunked_causal_lm_loss(hidden, labels, weight, torch.tensor(33), chunk=0)  # the CPU plan's
    (g_once,) = torch.autograd.grad(at_once, hidden)
    assert torch.allclose(full.double(), at_once.double(), rtol=1e-6)
    assert torch.allclose(g_full, g_once, rtol=1e-6, atol=1e-9)
    # chunk 0 never applies the head where no label follows: NaN hidden states there (positions 0-8) leave the loss
    # and every gradient finite, where the full computation's backward turns them into NaN
    poisoned = hidden.detach().clone()
    poisoned[0, :9] = float("nan")
    poisoned.requires_grad_(True)
    skipped = chunked_causal_lm_loss(poisoned, labels, weight, torch.tensor(33), chunk=0)
    (g_skipped,) = torch.autograd.grad(skipped, poisoned)
    assert torch.allclose(skipped.double(), full.double(), rtol=1e-6) and torch.isfinite(g_skipped).all()
    (g_poisoned,) = torch.autograd.grad(ForCausalLMLoss(poisoned @ weight.T, labels, 97, torch.tensor(33)), poisoned)
    assert not torch.isfinite(g_poisoned).all()


@pytest.mark.parametrize("chunk", [0, 7])
def test_a_batch_without_labels_still_backpropagates(chunk):
    """A micro-batch whose rows have no labelled token (a response cut away entirely) gives loss 0 that is still
    part of the graph: backward() works (zero gradients) instead of failing the step."""
    hidden = torch.randn(1, 12, 16, requires_grad=True)
    weight = torch.randn(97, 16)
    labels = torch.full((1, 12), IGNORE_INDEX)
    loss = chunked_causal_lm_loss(hidden, labels, weight, torch.tensor(1), chunk=chunk)
    loss.backward()
    assert float(loss) == 0.0 and hidden.grad is not None and float(hidden.grad.abs().max()) == 0.0


def test_cpu_plan_trains_exactly_like_the_stock_model(base_model_dir, tokenizer):
    """The CPU plan applies the frozen head at the labelled positions only: the same loss and LoRA gradients as
    the stock model computing every position's logits (fp32, packed rows, as the CPU default trains)."""
    from personatune.model import dequantize_frozen_base
    from tests.test_packing import features

    model = _trainable_model(base_model_dir)
    dequantize_frozen_base(model)
    packed = collator(tokenizer, packing=True)([{k: v for k, v in f.items() if k != "attention_mask"}
                                                for f in features(tokenizer)])
    loss_stock, g_stock = _loss_and_lora_grads(model, packed)
    plan = plan_training(FinetuneConfig(compute_dtype="fp32"), cuda=False)
    apply_plan(model, plan, torch.float32)
    assert plan.lean_head and model.get_base_model().get_output_embeddings().__class__.__name__ == "_LeanHead"
    loss, g = _loss_and_lora_grads(model, packed)
    assert abs(loss - loss_stock) / loss_stock < 1e-6 and float((g - g_stock).norm() / g_stock.norm()) < 1e-5
    assert g_stock.abs().sum() > 0
    model.eval()  # evaluation (the Trainer's held-out loss) computes every position's logits again
    with torch.no_grad():
        assert model(**packed).logits.shape[-1] == model.config.vocab_size


def test_varlen_collator_marks_example_boundaries(tokenizer):
    rows = [("Be grim.", "Hi?", "No."), ("Be grim.", "Why?", "Because the void said so.")]
    feats = [dict(zip(("input_ids", "labels"), encode_example(tokenizer, *r))) for r in rows]
    batch = collator(tokenizer, packing=True, varlen=True)(feats)
    n0, n1 = (len(f["input_ids"]) for f in feats)
    assert batch["cu_seq_lens_q"].tolist() == [0, n0, n0 + n1] and batch["max_length_q"] == max(n0, n1)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, n0]


def test_gpu_plan_model_gives_the_padded_loss_in_fp32(base_model_dir, tokenizer):
    """apply_plan (lean head + chunked loss; varlen falls back to SDPA on CPU) on packed rows == stock padded loss.

    The frozen weights are dequantized before any forward pass: bitsandbytes' CPU 4-bit kernel rounds differently
    for different batch shapes on some CPUs (3e-4 relative seen here), which is not what this test is about."""
    from personatune.model import dequantize_frozen_base
    from tests.test_packing import features

    model = _lora_model(base_model_dir, trainable=False)
    dequantize_frozen_base(model)
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


def test_dequantized_weights_only_on_a_card_with_room_and_never_with_checkpointing():
    gpu = FinetuneConfig(profile="gpu")
    big = plan_training(gpu, LLAMA_7B, LENGTHS, memory_gib=80, cuda=True)
    assert big.dequantized_base and big.compile and big.checkpoint_layers == 0
    assert big.estimated_peak_gib > plan_training(gpu.replace(compile=False), LLAMA_7B, LENGTHS, memory_gib=16,
                                                  cuda=True).estimated_peak_gib
    # 24 GiB: the dequantized 7B (12 GiB of weights) fits only with the compiled layers' smaller activations
    assert plan_training(gpu, LLAMA_7B, LENGTHS, memory_gib=24, cuda=True).dequantized_base
    assert not plan_training(gpu.replace(compile=False), LLAMA_7B, LENGTHS, memory_gib=24, cuda=True).dequantized_base
    small = plan_training(gpu, LLAMA_7B, LENGTHS, memory_gib=16, cuda=True)
    assert not small.dequantized_base and small.estimated_peak_gib <= 0.92 * 16
    low = plan_training(FinetuneConfig(profile="low-memory"), LLAMA_7B, LENGTHS, memory_gib=141, cuda=True)
    assert not low.dequantized_base and low.compile
    assert not plan_training(FinetuneConfig(profile="gpu", compile=False), LLAMA_7B, LENGTHS, memory_gib=80, cuda=True).compile
    assert "compiled layers on" in big.describe() and "dequantized" in big.describe()


def _loss_and_lora_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None])
    return loss.detach(), grads


def _lora_model(base_model_dir, trainable: bool):
    """The embedded model in fp32 with non-zero LoRA B (a fresh adapter is an exact no-op), no dropout."""
    cfg = FinetuneConfig(compute_dtype="fp32", lora_dropout=0.0)
    model = load_qlora_model(base_model_dir, cfg, trainable=trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def _trainable_model(base_model_dir):
    model = _lora_model(base_model_dir, trainable=True)
    model.train()
    return model


def test_dequantized_base_trains_exactly_like_the_4bit_base(base_model_dir, tokenizer):
    """The GPU profile's dequantized weights are the NF4 values: same loss and LoRA gradients (fp32, CPU)."""
    from personatune.model import dequantize_frozen_base
    from tests.test_packing import features

    model = _trainable_model(base_model_dir)
    batch = collator(tokenizer)(features(tokenizer))
    loss4, g4 = _loss_and_lora_grads(model, batch)
    assert dequantize_frozen_base(model) == 30 * 7
    loss, g = _loss_and_lora_grads(model, batch)
    assert abs(loss - loss4) / loss4 < 1e-6 and float((g - g4).norm() / g4.norm()) < 1e-5
    assert g.shape == g4.shape and g4.abs().sum() > 0


def test_compiled_layers_trace_the_4bit_lora_layer_and_keep_loss_and_gradients(base_model_dir, tokenizer):
    """Regional compilation as the GPU profile does it, traced through dynamo + AOT autograd on the CPU
    (the 'aot_eager' backend: the same graphs and autograd as on CUDA, eager kernels): same loss, same LoRA
    gradients, no graph break in the 4-bit + LoRA decoder layer, and adapters save under unchanged names."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from personatune.speedups import compile_layers
    from tests.test_packing import features

    model = _trainable_model(base_model_dir)
    batch = collator(tokenizer)(features(tokenizer))
    loss_eager, g_eager = _loss_and_lora_grads(model, batch)
    keys = set(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    try:
        assert compile_layers(model, backend="aot_eager") == 30
        loss, g = _loss_and_lora_grads(model, batch)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] >= 1
    finally:
        torch._dynamo.reset()
    assert abs(loss - loss_eager) / loss_eager < 1e-5 and float((g - g_eager).norm() / g_eager.norm()) < 1e-4
    assert set(model.state_dict()) == keys


def test_logging_every_few_steps_still_records_every_step_loss(tmp_path, base_model_dir, tokenizer, good_rows):
    """GPU plans log every GPU_LOGGING_STEPS (a log reads the loss back from the device); history.json still gets
    each step's loss, and those agree with what the Trainer logged for the same steps."""
    import dataclasses
    import json

    from personatune.data import build_dataset
    from personatune.model import build_model
    from personatune.tokenization import tokenize_dataset
    from personatune.train import plan_for_run, train_adapter
    from tests.conftest import write_csv
    from transformers import TrainerCallback

    assert plan_training(FinetuneConfig(profile="gpu"), LLAMA_7B, LENGTHS, memory_gib=24, cuda=True).logging_steps > 1
    cfg = FinetuneConfig(compute_dtype="fp32", max_steps=4, micro_batch_size=2, grad_accum=2, eval_fraction=0.2)
    csv = write_csv(tmp_path / "quotes.csv", good_rows)
    ds = build_dataset(csv, cfg.eval_fraction, tmp_path / "dataset")
    tokenized = tokenize_dataset(ds, tokenizer, cfg.max_seq_len, cfg.on_long_row, tmp_path / "tokens")
    init = build_model(base_model_dir, cfg, tmp_path / "init")
    logged = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append((state.global_step, logs["loss"]))

    plan = dataclasses.replace(plan_for_run(cfg, base_model_dir, tokenized), logging_steps=2)  # as a GPU plan logs
    adapter = train_adapter(cfg, plan, base_model_dir, init / "adapter", tokenized, tmp_path / "adapter",
                            callbacks=[Logs()])
    history = json.loads((adapter / "history.json").read_text())
    steps = {e["step"]: e["loss"] for e in history["loss"]}
    assert [s for s, _ in logged] == [2, 4] and sorted(steps) == [1, 2, 3, 4]
    assert history["layout"]["logging_steps"] == 2
    for step, loss in logged:  # the Trainer logs the mean over the steps since its last log
        assert abs((steps[step - 1] + steps[step]) / 2 - loss) < 1e-3, (steps, logged)
    assert all(0.5 < v < 15 for v in steps.values()) and len(set(steps.values())) == 4
    assert all(e["learning_rate"] is not None and e["epoch"] > 0 for e in history["loss"])
    assert history["peak_memory_gib"] is None  # CUDA peaks only (personatune.train.training_peak_gib)


def test_training_peak_is_read_on_cuda_only_and_shown_next_to_the_estimate():
    import torch

    from personatune.train import training_peak_gib

    plan = plan_training(FinetuneConfig(profile="gpu"), LLAMA_7B, LENGTHS, memory_gib=8, cuda=True)
    assert training_peak_gib(torch.device("cpu"), plan) is None
    if torch.cuda.is_available():
        peak = training_peak_gib(torch.device("cuda", 0), plan)
        assert set(peak) == {"allocated", "reserved", "estimated"} and peak["estimated"] == round(plan.estimated_peak_gib, 2)


def test_the_budget_leaves_the_allocators_measured_margin():
    from personatune.plan import ALLOCATOR_MARGIN_GIB, HEADROOM, budget_gib

    assert budget_gib(8) == pytest.approx(8 * HEADROOM - ALLOCATOR_MARGIN_GIB) and ALLOCATOR_MARGIN_GIB >= 0.57
    llama = ModelShape(hidden=4096, layers=32, intermediate=11008, vocab=32000)
    for card in (6, 8, 12, 16, 24):
        plan = plan_training(FinetuneConfig(profile="gpu"), llama, LENGTHS, memory_gib=card, cuda=True)
        assert plan.budget_gib == pytest.approx(budget_gib(card), abs=0.01)
        if plan.reason != "card too small for the estimate; smallest layout":
            assert plan.estimated_peak_gib <= budget_gib(card)
    # the layout that ran out of memory on an 8 GiB card (issue 18: 19/32 layers, "7.3 GiB of a 7.4 GiB budget")
    # is no longer chosen there: more layers are checkpointed
    assert plan_training(FinetuneConfig(profile="gpu"), llama, LENGTHS, memory_gib=8, cuda=True).checkpoint_layers > 19


def attempts_until_it_fits(plan, fits, card_gib=8.0):
    """The layouts train_with_oom_backoff tries when `fits(layout)` says which ones fit the card (pure: no model)."""
    from personatune.train import train_with_oom_backoff

    tried, messages = [], []

    def attempt(p):
        tried.append(p)
        if not fits(p):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (emulated)")
        return p

    return train_with_oom_backoff(plan, attempt, log=messages.append, free_memory=lambda: None, card_gib=card_gib), tried, messages


def test_oom_backoff_checkpoints_every_layer_before_it_shrinks_the_batch_and_halves_from_the_last_attempt():
    big = plan_training(FinetuneConfig(profile="gpu"), LLAMA_7B, LENGTHS, memory_gib=80, cuda=True)
    assert big.dequantized_base and big.checkpoint_layers == 0 and (big.micro_batch_size, big.grad_accum) == (16, 1)
    done, tried, messages = attempts_until_it_fits(big, lambda p: p.micro_batch_size <= 4)
    layouts = [(p.micro_batch_size, p.grad_accum, p.checkpoint_layers, p.dequantized_base) for p in tried]
    assert layouts == [(16, 1, 0, True), (16, 1, 0, False), (16, 1, 32, False), (8, 2, 32, False), (4, 4, 32, False)]
    assert done is tried[-1] and all(p.micro_batch_size * p.grad_accum == 16 for p in tried)  # same step throughout
    assert messages[-1] == ("CUDA out of memory with 8 x 2, checkpointing 32/32; retrying with 4 x 4, checkpointing "
                            "32/32 (effective batch 16 kept)")
    # a plan that already split the step halves from where it is, not from the config's micro-batch
    _, tried, _ = attempts_until_it_fits(dataclasses_replace(big, micro_batch_size=8, grad_accum=2, checkpoint_layers=32,
                                                             dequantized_base=False), lambda p: p.micro_batch_size <= 2)
    assert [(p.micro_batch_size, p.grad_accum) for p in tried] == [(8, 2), (4, 4), (2, 8)]


def dataclasses_replace(plan, **changes):
    import dataclasses

    return dataclasses.replace(plan, **changes)


def test_oom_backoff_gives_up_with_one_clear_error_instead_of_looping():
    from personatune.plan import DoesNotFit

    for plan in (plan_training(FinetuneConfig(profile="gpu"), LLAMA_7B, LENGTHS, memory_gib=8, cuda=True),
                 plan_training(FinetuneConfig(micro_batch_size=4, grad_accum=2), cuda=False)):
        with pytest.raises(DoesNotFit) as err:
            attempts_until_it_fits(plan, lambda p: False, card_gib=8.0)
        message = str(err.value)
        assert "8.0 GiB card" in message and "--profile low-memory" in message and "Tried to allocate 2.00 GiB" in message
        assert message.count(" x ") == len(message.split("; ")) >= 3  # every layout tried is named
    # the CPU plan (no per-layer checkpointing) only halves the micro-batch: 4 x 2, 2 x 4, 1 x 8, then gives up
    _, tried, _ = attempts_until_it_fits(plan, lambda p: p.micro_batch_size == 1)
    assert [(p.micro_batch_size, p.grad_accum) for p in tried] == [(4, 2), (2, 4), (1, 8)]
    # anything but an out-of-memory error is not retried
    calls = []

    def broken(p):
        calls.append(p)
        raise ValueError("bad data")

    from personatune.train import train_with_oom_backoff

    with pytest.raises(ValueError, match="bad data"):
        train_with_oom_backoff(plan, broken, log=print, free_memory=lambda: None)
    assert len(calls) == 1


def test_memory_cap_is_read_and_turned_into_a_fraction_of_the_card():
    from personatune.plan import GIB, memory_cap_gib, memory_fraction

    assert memory_cap_gib({}) is None and memory_cap_gib({"PERSONATUNE_GPU_MEMORY_GIB": "8"}) == 8.0
    with pytest.raises(ValueError, match="PERSONATUNE_GPU_MEMORY_GIB='eight'"):
        memory_cap_gib({"PERSONATUNE_GPU_MEMORY_GIB": "eight"})
    with pytest.raises(ValueError, match="positive"):
        memory_cap_gib({"PERSONATUNE_GPU_MEMORY_GIB": "0"})
    h200 = int(139.8 * GIB)
    assert memory_fraction(8, h200) == pytest.approx(8 / 139.8)
    assert memory_fraction(None, h200) is None and memory_fraction(200, h200) is None  # no cap above the card


def test_the_gpu_optimizer_is_the_recipes_paged_adamw_8bit_without_host_syncs(tmp_path):
    """On a GPU the Trainer gets `optimizer_without_host_syncs`: the class and settings paged_adamw_8bit names, with
    a step() that leaves out bitsandbytes' torch.cuda.synchronize() after each parameter; the same updates."""
    from bitsandbytes.optim.optimizer import Optimizer8bit
    from transformers import Trainer, TrainingArguments

    from personatune.speedups import optimizer_without_host_syncs

    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 64))
    args = TrainingArguments(output_dir=str(tmp_path), optim="paged_adamw_8bit", learning_rate=1e-2, use_cpu=True,
                             report_to="none")
    stock_cls, stock_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    cls, kwargs = optimizer_without_host_syncs(args, model)
    assert issubclass(cls, stock_cls) and issubclass(cls, Optimizer8bit) and cls.step is not stock_cls.step
    assert kwargs == stock_kwargs and kwargs.get("optim_bits") == 8 and kwargs.get("is_paged") is True
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(cls, kwargs))
    assert type(trainer.create_optimizer()) is cls  # what train_adapter's Trainer builds on a GPU
    assert optimizer_without_host_syncs(TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch",
                                                          use_cpu=True, report_to="none"), model) is None

    torch.manual_seed(0)
    start = [torch.randn(64, 8), torch.randn(8, 64)]
    params = {name: [torch.nn.Parameter(t.clone()) for t in start] for name in ("stock", "no_sync")}
    optimizers = {"stock": stock_cls(params["stock"], **stock_kwargs), "no_sync": cls(params["no_sync"], **kwargs)}
    for _ in range(3):
        grads = [torch.randn_like(t) for t in start]
        for name, optimizer in optimizers.items():
            for p, g in zip(params[name], grads):
                p.grad = g.clone()
            optimizer.step()
    for stock, no_sync, before in zip(params["stock"], params["no_sync"], start):
        assert not torch.equal(stock, before) and torch.equal(stock, no_sync)
    assert training_arguments(FinetuneConfig(), tmp_path, 100).logging_nan_inf_filter  # kept on a CPU (no sync there)
