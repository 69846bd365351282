"""Decoding settings: stored with every bundle, read back by every consumer, sampled evaluations reproducible."""
from __future__ import annotations

import json

import pytest
import torch

from personatune.config import ConfigError, FinetuneConfig
from personatune.decoding import Decoding, generation_config, load_decoding

PROMPTS = [("Respond as Wednesday Addams: deadpan and morbid.", "Do you like cats?"),
           ("Respond as Wednesday Addams: deadpan and morbid.", "What is your favourite food?"),
           ("Respond as Wednesday Addams: deadpan and morbid.", "Shall we go to the beach?")]


@pytest.mark.parametrize("decoding", [Decoding(64, 1.1, 0), Decoding(48, 1.15, 4, 0.7, 0.9),
                                      Decoding(64, 1.1, 0, base_contrast=0.5)], ids=["greedy", "sampled", "contrast"])
def test_generation_config_round_trips_the_decoding(tmp_path, tokenizer, decoding):
    generation_config(tokenizer, decoding).save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "generation_config.json").read_text())
    assert stored.get("do_sample", False) is decoding.sampling
    assert stored["repetition_penalty"] == decoding.repetition_penalty and stored["stop_strings"] == ["###"]
    assert load_decoding(tmp_path) == decoding
    assert stored.get("base_contrast", 0.0) == decoding.base_contrast


def test_a_config_decoding_reaches_the_bundle_settings():
    cfg = FinetuneConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram_size=3, base_contrast=0.3)
    assert Decoding.from_config(cfg) == Decoding(cfg.max_new_tokens, 1.2, 3, 0.7, 0.9, 0.3)
    assert Decoding.from_config(cfg).without_contrast() == Decoding(cfg.max_new_tokens, 1.2, 3, 0.7, 0.9, 0.0)
    with pytest.raises(ConfigError, match="base_contrast must be >= 0"):
        FinetuneConfig(base_contrast=-0.1)
    assert Decoding.from_config(FinetuneConfig()).sampling is False  # the default stays greedy (QUALITY.md)
    with pytest.raises(ConfigError, match="temperature must be >= 0 and top_p in"):
        FinetuneConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        FinetuneConfig(temperature=-0.5)


def test_sampled_replies_depend_on_the_seed_only(base_model_dir, tokenizer):
    """Same seed, same replies, whatever ran before (evaluation reseeds per batch); another seed, other replies."""
    from personatune.evaluate import generate_replies
    from personatune.model import dequantize_frozen_base, load_base_model

    model = load_base_model(base_model_dir, FinetuneConfig())
    dequantize_frozen_base(model)
    sampled = Decoding(16, 1.1, 0, 0.9, 0.95)
    first = generate_replies(model, tokenizer, PROMPTS, sampled, seed=7, batch_size=2)
    torch.manual_seed(12345)
    torch.rand(1000)  # a different global RNG state, as after scoring another model
    again = generate_replies(model, tokenizer, PROMPTS, sampled, seed=7, batch_size=2)
    other = generate_replies(model, tokenizer, PROMPTS, sampled, seed=8, batch_size=2)
    assert [g["reply"] for g in first] == [g["reply"] for g in again]
    assert [g["reply"] for g in first] != [g["reply"] for g in other]
    greedy = [generate_replies(model, tokenizer, PROMPTS, Decoding(16, 1.1), seed=s) for s in (1, 2)]
    assert [g["reply"] for g in greedy[0]] == [g["reply"] for g in greedy[1]]  # the seed never touches greedy


def test_chat_uses_the_bundle_decoding_unless_overridden(tmp_path, tokenizer):
    from flows.chat import decoding_for, parse_args

    generation_config(tokenizer, Decoding(64, 1.1, 0)).save_pretrained(tmp_path)
    assert decoding_for(parse_args([]), tmp_path) == Decoding(96, 1.1, 0)
    assert decoding_for(parse_args(["--temperature", "0.7", "--top-p", "0.9"]), tmp_path) == Decoding(96, 1.1, 0, 0.7, 0.9)
    assert decoding_for(parse_args(["--repetition-penalty", "1.0"]), tmp_path).repetition_penalty == 1.0
    generation_config(tokenizer, Decoding(64, 1.1, 0, base_contrast=0.5)).save_pretrained(tmp_path)
    assert decoding_for(parse_args([]), tmp_path).base_contrast == 0.5
    assert decoding_for(parse_args(["--base-contrast", "0"]), tmp_path).base_contrast == 0.0


def test_several_sampled_replies_per_prompt_are_averaged(base_model_dir, tokenizer):
    """reply_samples = 3: every prompt answered three times (sample 0 is the one-sample evaluation's reply), the
    prompt's similarity is the mean of its three, distinct-2 the mean over the three reply sets, loop and run-on
    rates over all nine replies. Greedy answers once whatever reply_samples says."""
    from personatune.evaluate import SAMPLE_SEED_STRIDE, generate_replies, score_model
    from personatune.metrics import distinct_n, paired_similarity, reply_stats
    from personatune.model import dequantize_frozen_base, load_base_model

    model = load_base_model(base_model_dir, FinetuneConfig())
    dequantize_frozen_base(model)
    rows = [{"instruction": i, "user": u, "reference": "Only if it rains on the funeral."} for i, u in PROMPTS]
    sampled = Decoding(16, 1.1, 0, 0.9, 0.95)
    one = score_model(model, tokenizer, {"probes": rows}, sampled, seed=5)["sets"]["probes"]
    three_card = score_model(model, tokenizer, {"probes": rows}, sampled, seed=5, reply_samples=3)
    three = three_card["sets"]["probes"]

    runs = [generate_replies(model, tokenizer, PROMPTS, sampled, seed=5 + j * SAMPLE_SEED_STRIDE) for j in range(3)]
    samples = [[g["reply"] for g in run] for run in runs]
    assert [r["samples"] for r in three["replies"]] == [list(s) for s in zip(*samples)]
    assert [r["reply"] for r in three["replies"]] == [r["reply"] for r in one["replies"]] == samples[0]
    assert len({tuple(s) for s in samples}) > 1  # the seeds differ, so do the replies
    sims = [paired_similarity(s, [r["reference"] for r in rows]) for s in samples]
    assert [r["similarity"] for r in three["replies"]] == pytest.approx([sum(x) / 3 for x in zip(*sims)], abs=1e-5)
    assert three["similarity"] == pytest.approx(sum(map(sum, sims)) / 9, abs=1e-5)
    assert three["distinct_2"] == pytest.approx(sum(distinct_n(s, 2) for s in samples) / 3)
    every = reply_stats([g for run in runs for g in run])
    assert (three["loop_rate"], three["run_on_rate"]) == (every["loop_rate"], every["run_on_rate"])
    assert three_card["reply_samples"] == 3 and three_card["distinct_2"] == three["distinct_2"]

    greedy = score_model(model, tokenizer, {"probes": rows}, Decoding(16, 1.1), seed=5, reply_samples=3)
    assert greedy["reply_samples"] == 1 and "samples" not in greedy["sets"]["probes"]["replies"][0]
    with pytest.raises(ConfigError, match="reply_samples must be >= 1"):
        FinetuneConfig(reply_samples=0)


def test_sets_generated_in_one_batch_get_their_own_replies_back(base_model_dir, tokenizer):
    """joint=True (the greedy default: every evaluation set in the same generation batches): each set gets the replies
    to its own prompts, in order, and the same replies as when each set is generated alone (greedy)."""
    from personatune.evaluate import replies_per_set
    from personatune.model import dequantize_frozen_base, load_base_model

    model = load_base_model(base_model_dir, FinetuneConfig())
    dequantize_frozen_base(model)
    rows = [{"instruction": i, "user": u, "reference": "-"} for i, u in PROMPTS]
    sets = {"golden": rows[:1], "probes": rows[1:]}
    joint = replies_per_set(model, tokenizer, sets, Decoding(8, 1.1), k=2, joint=True)
    alone = replies_per_set(model, tokenizer, sets, Decoding(8, 1.1), k=2, joint=False)
    for name, set_rows in sets.items():
        assert len(joint[name]) == 2  # k reply sets
        assert [g["user"] for g in joint[name][0]] == [r["user"] for r in set_rows]
        assert [g["reply"] for g in joint[name][0]] == [g["reply"] for g in alone[name][0]]
    assert joint["golden"][0][0]["reply"] != joint["probes"][0][0]["reply"]


def _adapted(base_model_dir, lora_b: float):
    """The embedded base, dequantized, with a q,v LoRA adapter whose B matrices are all `lora_b` (0: peft's initial
    adapter, which changes nothing)."""
    from peft import get_peft_model

    from personatune.model import dequantize_frozen_base, load_base_model, lora_config

    cfg = FinetuneConfig()
    model = load_base_model(base_model_dir, cfg)
    dequantize_frozen_base(model)
    torch.manual_seed(3)  # peft draws the A matrices: the same adapter whatever ran before
    model = get_peft_model(model, lora_config(cfg, model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * lora_b)
    return model.eval()


@pytest.mark.parametrize("penalize_padding", [False, True], ids=["padding-ignored", "padding-penalized"])
def test_base_contrast_scores_tuned_against_base_log_probs(base_model_dir, tokenizer, penalize_padding):
    """The processor's scores, step by step on a left-padded batch, are (1 + b) log p_tuned - b log p_base over the
    tokens with p_tuned >= 0.1 x the best one's (-inf elsewhere), where log p_base is a full forward of the same
    model with the adapter off: its own KV cache, attention mask and positions agree with that forward. Both get the
    repetition penalty (generate() applies it to the tuned scores before the processor sees them): with the left
    padding left out (transformers 5.2x's generate()) or counted with the prompt (5.17's)."""
    import math

    from transformers import RepetitionPenaltyLogitsProcessor

    from personatune.decoding import base_contrast_processor, generate_ignores_left_padding
    from personatune.tokenization import encode_prompt

    model = _adapted(base_model_dir, 0.05)
    batch = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, i, u, "scaffold") for i, u in PROMPTS]},
                          return_tensors="pt", padding_side="left")
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths: some rows are padded
    processor = base_contrast_processor(model, batch["attention_mask"], Decoding(16, 1.3, base_contrast=0.5),
                                        penalize_padding=penalize_padding)
    # what generate() applies to the tuned scores: the penalty, the left padding (EOS) left out or counted
    assert generate_ignores_left_padding()  # transformers 5.2x, as installed here: the default is "left out"
    ignore = {} if penalize_padding else {"prompt_ignore_length": (batch["attention_mask"] != 0).int().argmax(1)}
    penalty = RepetitionPenaltyLogitsProcessor(1.3, **ignore)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for step in range(3):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            tuned_logits = penalty(ids, model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1])
            with model.disable_adapter():
                base_logits = penalty(ids, model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1])
            tuned, base = torch.log_softmax(tuned_logits, -1), torch.log_softmax(base_logits, -1)
            assert (tuned - base).abs().max() > 0.01  # the adapter changes the distribution
            got = processor(ids, tuned_logits.clone())
            plausible = tuned >= tuned.max(-1, keepdim=True).values + math.log(0.1)
            assert torch.equal(torch.isfinite(got), plausible)
            torch.testing.assert_close(got[plausible], (1.5 * tuned - 0.5 * base)[plausible], atol=2e-4, rtol=0)
            chosen = got.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, chosen], 1), torch.cat([mask, torch.ones_like(chosen)], 1)


def test_base_contrast_changes_nothing_when_the_adapter_changes_nothing(base_model_dir, tokenizer):
    """With peft's initial adapter (B = 0) tuned and base agree, so the contrast leaves greedy replies as they are;
    with a trained adapter it changes them; sampled with it, the replies depend on the seed only. A model without
    an adapter to switch off is refused."""
    from personatune.evaluate import generate_replies
    from personatune.model import load_base_model

    contrast, plain = Decoding(16, 1.1, base_contrast=1.0), Decoding(16, 1.1)
    initial = _adapted(base_model_dir, 0.0)
    assert ([g["reply"] for g in generate_replies(initial, tokenizer, PROMPTS, contrast)]
            == [g["reply"] for g in generate_replies(initial, tokenizer, PROMPTS, plain)])
    trained = _adapted(base_model_dir, 0.05)
    assert ([g["reply"] for g in generate_replies(trained, tokenizer, PROMPTS, contrast)]
            != [g["reply"] for g in generate_replies(trained, tokenizer, PROMPTS, plain)])
    sampled = Decoding(16, 1.1, 0, 0.9, 0.95, base_contrast=1.0)  # the contrast, then temperature and top-p
    once = [g["reply"] for g in generate_replies(trained, tokenizer, PROMPTS, sampled, seed=7)]
    assert once == [g["reply"] for g in generate_replies(trained, tokenizer, PROMPTS, sampled, seed=7)]
    assert once != [g["reply"] for g in generate_replies(trained, tokenizer, PROMPTS, sampled, seed=8)]
    with pytest.raises(ValueError, match="base_contrast decodes an adapter against its base"):
        generate_replies(load_base_model(base_model_dir, FinetuneConfig()), tokenizer, PROMPTS, contrast)


def test_the_eos_only_run_on_rate_is_read_from_the_replies_with_stop_criteria(base_model_dir, tokenizer):
    """The report's "with EOS as the only stop" rate, read from how each reply generated with the `###` criterion
    ended, equals that of generating again without it (the base runs on often: a real mix of endings)."""
    from personatune.evaluate import eos_only_run_on_rate, generate_replies
    from personatune.metrics import reply_stats
    from personatune.model import dequantize_frozen_base, load_base_model

    model = load_base_model(base_model_dir, FinetuneConfig())
    dequantize_frozen_base(model)
    prompts = PROMPTS + [(PROMPTS[0][0], u) for u in ("Write me a poem.", "Hi", "Tell me about your weekend plans.")]
    stopped = generate_replies(model, tokenizer, prompts, Decoding(24, 1.1))
    eos_only = generate_replies(model, tokenizer, prompts, Decoding(24, 1.1), stop_markers=False)
    assert {g["ended_by"] for g in stopped} >= {"eos"} and {g["ended_by"] for g in stopped} - {"eos"}
    assert eos_only_run_on_rate(stopped) == reply_stats(eos_only)["run_on_rate"]


def test_base_contrast_runs_the_base_on_the_rows_still_writing(base_model_dir, tokenizer):
    """A row that has written EOS (generate() pads it from then on) leaves the base's batch and KV cache: generate()
    gives the same tokens as with a processor that keeps every row (no EOS ids given), and the base's passes shrink
    as rows end."""
    from transformers import LogitsProcessorList

    from personatune.decoding import base_contrast_processor
    from personatune.tokenization import encode_prompt, generation_eos

    model = _adapted(base_model_dir, 0.02)
    prompts = PROMPTS + [("Be terse.", "Say one word."), ("Be terse.", "Yes or no?")]
    batch = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, i, u, "scaffold") for i, u in prompts]},
                          return_tensors="pt", padding_side="left")
    decoding, eos = Decoding(48, 1.1, base_contrast=0.5), generation_eos(tokenizer, "scaffold")
    rows_seen: list[int] = []

    def generate(eos_ids):
        rows_seen.clear()
        processor = base_contrast_processor(model, batch["attention_mask"], decoding, eos_ids)
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=48, do_sample=False, repetition_penalty=1.1,
                                  eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                  logits_processor=LogitsProcessorList([processor]))

    hook = model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        every_row = generate(())
        every_row_passes = list(rows_seen)
        live_rows = generate([eos] if isinstance(eos, int) else eos)
    finally:
        hook.remove()
    assert torch.equal(every_row, live_rows)
    ended = [(row[batch["input_ids"].shape[1]:-1] == tokenizer.eos_token_id).any().item() for row in live_rows]
    assert any(ended)  # a row wrote EOS before the last step
    assert set(every_row_passes) == {len(prompts)}  # tuned and base passes over all five rows
    base_passes = rows_seen[1::2]  # tuned pass, then the processor's base pass, each step
    assert base_passes[0] == len(prompts) and min(base_passes) < len(prompts)
    assert base_passes == sorted(base_passes, reverse=True)


MORE_PROMPTS = PROMPTS + [("Be terse.", "Say one word."), ("Be terse.", "Yes or no?"),
                          (PROMPTS[0][0], "Tell me about your weekend plans, in detail, with every place you will visit.")]


def _prompt_batch(tokenizer, prompts):
    from personatune.tokenization import encode_prompt

    return tokenizer.pad({"input_ids": [encode_prompt(tokenizer, i, u, "scaffold") for i, u in prompts]},
                         return_tensors="pt", padding_side="left")


@pytest.mark.parametrize("lora_b, decoding, by_marker", [(0.0, Decoding(40, 1.15), False),
                                                         (0.02, Decoding(40, 1.15, base_contrast=0.7), False),
                                                         (0.02, Decoding(40, 1.1, 3), True)],
                         ids=["base", "contrast", "no-repeat-3"])
def test_greedy_decoding_from_a_prompt_pass_writes_what_generate_writes(base_model_dir, tokenizer, lora_b, decoding,
                                                                        by_marker):
    """greedy_decode (rows that end leave the batch) gives the same tokens as model.generate() with the same settings:
    EOS, the `###` stop string, the repetition penalty (left padding left out), no-repeat n-grams and the contrast with
    the base; rows end at different steps, and its passes shrink as they do. static_greedy_decode (the GPU's loop:
    a static cache and an explicit mask) gives them too."""
    from transformers import LogitsProcessorList, StopStringCriteria

    from personatune.decoding import base_contrast_processor, greedy_decode, prompt_pass, static_greedy_decode
    from personatune.tokenization import generation_eos, stop_token_ids

    model = _adapted(base_model_dir, lora_b)
    batch = _prompt_batch(tokenizer, MORE_PROMPTS)
    eos = generation_eos(tokenizer, "scaffold")
    contrast = ({"logits_processor": LogitsProcessorList([base_contrast_processor(model, batch["attention_mask"],
                                                                                   decoding, eos)])}
                if decoding.base_contrast else {})
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=decoding.max_new_tokens, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id, stop_strings=["###"], tokenizer=tokenizer,
                                  **decoding.generate_kwargs(), **contrast)[:, batch["input_ids"].shape[1]:]
    rows_seen: list[int] = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        got = greedy_decode(model, prompt_pass(model, batch["input_ids"], batch["attention_mask"]), decoding,
                            stop_token_ids(tokenizer), tokenizer.pad_token_id,
                            StopStringCriteria(tokenizer, ["###"]))
    finally:
        hook.remove()
    assert torch.equal(got[:, :expected.shape[1]], expected)
    assert (got[:, expected.shape[1]:] == tokenizer.pad_token_id).all()
    lengths = [(row != tokenizer.pad_token_id).sum().item() for row in expected]
    assert len(set(lengths)) > 2  # rows ended at different steps
    ends = [tokenizer.decode(row[row != tokenizer.pad_token_id]) for row in expected]
    # rows ended by the stop string (they write "\n####"): in the no-repeat case, where the replies do that
    assert any(text.rstrip().endswith("###") for text in ends) == by_marker
    assert rows_seen[0] == len(MORE_PROMPTS) and min(rows_seen) < len(MORE_PROMPTS)  # finished rows left the batch
    # the GPU's loop (static cache, every row kept), its steps run eagerly here instead of as CUDA graph replays
    static = static_greedy_decode(model, batch["input_ids"], batch["attention_mask"], decoding,
                                  stop_token_ids(tokenizer), tokenizer.pad_token_id,
                                  StopStringCriteria(tokenizer, ["###"]), graphs=False)
    assert torch.equal(static, got)


def test_reply_losses_from_the_prompt_pass_equal_a_full_forward(base_model_dir, tokenizer):
    """The loss of each reference after its prompt, from the prompt pass (left-padded batch, replies of different
    lengths, computed in groups of rows), equals the evaluation's loss over prompt + reference to 1e-5, and leaves
    the prompt pass's cache as it was (every layer's keys and values, so decoding can start from it afterwards)."""
    from personatune.decoding import prompt_pass, reply_losses
    from personatune.evaluate import reference_loss
    from personatune.tokenization import encode_response

    model = _adapted(base_model_dir, 0.02)
    references = ["Cats are fine.", "Ashes. Mostly of my enemies, lightly salted, served cold at midnight.",
                  "The sea keeps its dead.", "No.", "Yes, if it rains.", "Nothing you would survive."]
    rows = [{"instruction": i, "user": u, "reference": r} for (i, u), r in zip(MORE_PROMPTS, references)]
    batch = _prompt_batch(tokenizer, MORE_PROMPTS)
    start = prompt_pass(model, batch["input_ids"], batch["attention_mask"])
    before = [t.clone() for layer in start.cache.layers for t in (layer.keys, layer.values)]
    replies = [encode_response(tokenizer, r) for r in references]
    parts = reply_losses(model, start, replies, logits_bytes=2 * 20 * model.config.vocab_size * 4)  # 2-row groups
    assert [n for _, n in parts] == [len(r) for r in replies]
    for row, (total, n) in zip(rows, parts):
        assert total / n == pytest.approx(reference_loss(model, tokenizer, [row]), abs=1e-5)
    pooled = sum(t for t, _ in parts) / sum(n for _, n in parts)
    assert pooled == pytest.approx(reference_loss(model, tokenizer, rows), abs=1e-5)
    after = [t for layer in start.cache.layers for t in (layer.keys, layer.values)]
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))


def test_the_contrast_starts_from_the_base_pass_kept_by_the_base_stage(base_model_dir, tokenizer):
    """score_model of the base keeps its prompt pass; the adapter's, decoded in contrast with the base, starts the
    base's side from it (no base pass over the prompts: one prompt-length pass per batch, the tuned model's) and
    writes the same replies and losses as without it. The base is scored as the flow scores it, before any adapter
    is put on it (a plain model), and the same base under peft with the adapter off scores exactly the same. The
    store keeps passes up to its byte budget only."""
    from personatune.decoding import BasePromptPasses
    from personatune.evaluate import score_model
    from personatune.model import dequantize_frozen_base, load_base_model

    plain = load_base_model(base_model_dir, FinetuneConfig())
    dequantize_frozen_base(plain)
    model = _adapted(base_model_dir, 0.02)
    rows = [{"instruction": i, "user": u, "reference": "Nothing you would survive."} for i, u in MORE_PROMPTS]
    sets, decoding = {"golden": rows[:2], "probes": rows[2:]}, Decoding(24, 1.15, base_contrast=0.7)
    passes = BasePromptPasses(2 ** 30)
    base = score_model(plain, tokenizer, sets, decoding.without_contrast(), similarity=False, base_passes=passes,
                       is_base=True)
    with model.disable_adapter():
        assert score_model(model, tokenizer, sets, decoding.without_contrast(), similarity=False)["sets"] == base["sets"]
    assert len(passes.passes) == 1  # one generation batch (both sets, greedy)
    prompt_length = _prompt_batch(tokenizer, MORE_PROMPTS)["input_ids"].shape[1]
    widths: list[int] = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        reused = score_model(model, tokenizer, sets, decoding, similarity=False, base_passes=passes)
        prompt_passes_reused = widths.count(prompt_length)
        widths.clear()
        alone = score_model(model, tokenizer, sets, decoding, similarity=False)
        prompt_passes_alone = widths.count(prompt_length)
    finally:
        hook.remove()
    assert (prompt_passes_reused, prompt_passes_alone) == (1, 2)
    for name in sets:
        assert [r["reply"] for r in reused["sets"][name]["replies"]] == [r["reply"] for r in alone["sets"][name]["replies"]]
        assert reused["sets"][name]["loss"] == alone["sets"][name]["loss"]
    kept = next(iter(passes.passes.values()))
    copy = passes.get(kept.ids, kept.mask)  # a copy to decode from: the kept one stays as it was
    assert copy is not None and copy.cache is not kept.cache and torch.equal(copy.logits, kept.logits)
    assert passes.get(kept.ids[1:], kept.mask[1:]) is None  # other prompts: no pass
    small = BasePromptPasses(1024)
    small.keep(kept)
    assert small.passes == {}  # over its budget: not kept


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_the_inference_base_loads_the_nf4_weights_without_the_4bit_detour(base_model_dir, compute):
    """load_inference_base (weights loaded in the compute dtype, each one the 4-bit load quantizes sent through NF4
    and back) holds bit for bit what the 4-bit load and dequantize_frozen_base hold, the untouched tensors (norms,
    embeddings, head) included, and so does load_inference_model; checkpoint_elements counts the checkpoint's
    numbers from the file headers."""
    from personatune.evaluate import load_inference_model
    from personatune.model import checkpoint_elements, dequantize_frozen_base, load_base_model, load_inference_base

    cfg = FinetuneConfig(compute_dtype=compute, keep_quantized_base=False)  # the base's own files, every time
    detour = load_base_model(base_model_dir, cfg)
    assert dequantize_frozen_base(detour) == 7 * detour.config.num_hidden_layers
    direct = load_inference_base(base_model_dir, cfg)
    expected, got = detour.state_dict(), direct.state_dict()
    assert sorted(expected) == sorted(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    plain = load_base_model(base_model_dir, FinetuneConfig(compute_dtype=compute, load_in_4bit=False)).state_dict()
    changed = [k for k in got if not torch.equal(plain[k], got[k])]
    assert len(changed) == 7 * detour.config.num_hidden_layers  # each projection of each layer, nothing else
    assert all(k.endswith("proj.weight") for k in changed)
    chosen = load_inference_model(base_model_dir, cfg).state_dict()
    assert all(torch.equal(expected[k], chosen[k]) for k in expected)
    assert checkpoint_elements(base_model_dir) == sum(p.numel() for p in direct.parameters())
    assert checkpoint_elements("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def _dequantized_state(model) -> dict:
    from personatune.model import dequantize_frozen_base

    dequantize_frozen_base(model)
    return model.state_dict()


def test_the_first_4bit_load_keeps_a_copy_that_later_loads_read_with_the_same_weights(base_model_dir, tmp_path,
                                                                                     monkeypatch):
    """keep_quantized_base: the first load saves the quantized model (whole, marked complete) under the cache; the
    next one loads it (a 4-bit model from the copy) with the same 4-bit codes and block scales, so the same
    dequantized weights and logits, and still names the base as its source (an adapter records the base, not the
    cache); off, or on a torchrun rank other than a host's first, nothing is written. A damaged copy is reloaded
    from the base and written again; an edited base gets a new copy and the old one goes."""
    import shutil

    from peft import get_peft_model

    from personatune.files import is_complete
    from personatune.model import load_base_model, lora_config, quantized_copy_dir

    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(base_model_dir, base)
    cfg = FinetuneConfig()
    load_base_model(str(base), FinetuneConfig(keep_quantized_base=False))
    monkeypatch.setenv("LOCAL_RANK", "1")
    load_base_model(str(base), cfg)
    assert not (tmp_path / "cache").exists()
    monkeypatch.setenv("LOCAL_RANK", "0")

    first = load_base_model(str(base), cfg)
    copy = quantized_copy_dir(str(base), cfg)
    assert is_complete(copy) and (copy / "model.safetensors").is_file()
    assert first.quantized_copy is None and first.config.name_or_path == str(base)
    second = load_base_model(str(base), cfg)
    assert second.quantized_copy == str(copy)
    assert second.config.name_or_path == second.name_or_path == str(base)
    assert type(second.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    adapted = get_peft_model(load_base_model(str(base), cfg), lora_config(cfg, second))
    assert adapted.peft_config["default"].base_model_name_or_path == str(base)
    expected, got = _dequantized_state(first), _dequantized_state(second)  # before any forward pass (AVX-512)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():  # the 4-bit kernels compute the same from the base and from the copy
        assert torch.equal(load_base_model(str(base), FinetuneConfig(keep_quantized_base=False))(ids).logits,
                           load_base_model(str(base), cfg)(ids).logits)

    (copy / "model.safetensors").write_bytes(b"not a model")  # damaged: loads from the base and writes it again
    again = load_base_model(str(base), cfg)
    assert again.quantized_copy is None and is_complete(copy)
    assert load_base_model(str(base), cfg).quantized_copy == str(copy)
    assert torch.equal(_dequantized_state(again)["model.layers.0.self_attn.q_proj.weight"],
                       expected["model.layers.0.self_attn.q_proj.weight"])

    (base / "config.json").touch()  # edited base: a new content fingerprint
    edited = quantized_copy_dir(str(base), cfg)
    assert edited != copy
    load_base_model(str(base), cfg)
    assert is_complete(edited) and not copy.exists()
    assert quantized_copy_dir("HuggingFaceTB/SmolLM2-135M-Instruct", cfg) is None  # a Hub id: no copy


def test_a_copy_that_cannot_be_written_costs_only_the_speed_up(base_model_dir, tmp_path, monkeypatch, capsys):
    """When the copy cannot be written the load still returns the 4-bit model, says why, and leaves nothing
    half-written: its folder's place taken by a file, and the weights' file over the process's file-size limit (the
    operating system refuses the write, as on a full disk)."""
    import resource
    import signal

    from personatune.model import load_base_model

    monkeypatch.setenv("PERSONATUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "quantized").write_text("in the way")
    model = load_base_model(base_model_dir, FinetuneConfig())
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert "Could not keep the 4-bit copy of the base" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["quantized"]

    (tmp_path / "cache" / "quantized").unlink()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, limits[1]))  # 1 MiB: the 4-bit weights are ~100 MB
    try:
        model = load_base_model(base_model_dir, FinetuneConfig())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit" and model.quantized_copy is None
    out = capsys.readouterr().out
    assert "Could not keep the 4-bit copy of the base" in out and "File too large" in out
    assert list((tmp_path / "cache" / "quantized").iterdir()) == []  # the temporary folder went with the failure
