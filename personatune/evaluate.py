"""Held-out loss of base vs tuned, and greedy sample replies that stop at the end of the response.

Replies stop *during generation*: EOS and the scaffold marker `###` are stop criteria handed to
`generate()`, so the model never spends tokens writing the next `### User:` turn. `cut_reply` only strips
the marker that triggered the stop.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from personatune.config import FinetuneConfig
from personatune.files import atomic_dir, is_complete
from personatune.prompt import STOP_STRINGS, cut_reply, format_prompt
from personatune.tokenization import IGNORE_INDEX, load_tokenized, load_tokenizer
from personatune.train import collator

TRAIN_LOSS_ROWS = 64  # train loss is measured on the first 64 training rows (a fixed sample)


@torch.no_grad()
def mean_loss(model, dataset, tok, batch_size: int = 16) -> float:
    """Mean cross-entropy per response token (prompt and padding are masked out)."""
    model.eval()
    collate = collator(tok)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += losses.item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_reply(model, tok, instruction: str, user: str, max_new_tokens: int = 64, stop: bool = True,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, streamer=None) -> dict:
    """One reply to the scaffolded prompt. `ended_by` says why generation stopped: eos, marker or length."""
    model.eval()
    prompt = format_prompt(instruction, user)
    inputs = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, do_sample=do_sample, use_cache=True)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stop:
        kwargs.update(eos_token_id=tok.eos_token_id, stop_strings=STOP_STRINGS, tokenizer=tok)
    else:
        kwargs.update(eos_token_id=None)
    out = model.generate(**inputs, **kwargs, streamer=streamer)
    new = out[0, inputs["input_ids"].shape[1]:]
    raw = tok.decode(new, skip_special_tokens=False)
    if stop and len(new) and new[-1].item() == tok.eos_token_id:
        ended_by = "eos"
    elif stop and "###" in raw:
        ended_by = "marker"
    else:
        ended_by = "length"
    text = tok.decode(new, skip_special_tokens=True)
    return {"instruction": instruction, "user": user, "reply": cut_reply(text), "raw": raw,
            "new_tokens": len(new), "ended_by": ended_by}


def evaluate_adapter(cfg: FinetuneConfig, resolved: str, adapter_dir: str | Path, tokenized_dir: str | Path,
                     dataset_dir: str | Path, out_dir: str | Path) -> Path:
    """Write eval.json and report.md to `out_dir`: losses base vs tuned, sample replies of both."""
    from datasets import load_from_disk

    from personatune.model import load_qlora_model

    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(resolved, cfg.base_revision)
    data = load_tokenized(tokenized_dir)
    model = load_qlora_model(resolved, cfg, adapter_dir=str(adapter_dir), trainable=False)
    # Train loss on a fixed sample keeps evaluation fast on a CPU; the held-out split is used whole.
    splits = {"eval": data["eval"], "train": data["train"].select(range(min(TRAIN_LOSS_ROWS, len(data["train"]))))}
    losses = {}
    for split, rows in splits.items():
        with model.disable_adapter():
            base = mean_loss(model, rows, tok)
        losses[split] = {"base": base, "tuned": mean_loss(model, rows, tok)}
    rows = load_from_disk(str(dataset_dir))["eval"]
    samples = []
    for i in range(min(cfg.num_samples, len(rows))):
        row = rows[i]
        tuned = generate_reply(model, tok, row["instruction"], row["user"], cfg.max_new_tokens)
        with model.disable_adapter():
            base = generate_reply(model, tok, row["instruction"], row["user"], cfg.max_new_tokens)
        samples.append({"instruction": row["instruction"], "user": row["user"], "reference": row["response"],
                        "tuned": tuned["reply"], "tuned_ended_by": tuned["ended_by"],
                        "base": base["reply"], "base_ended_by": base["ended_by"]})
    history = json.loads((Path(adapter_dir) / "history.json").read_text())
    result = {
        "eval_loss": {"base": losses["eval"]["base"], "tuned": losses["eval"]["tuned"]},
        "train_loss": {"base": losses["train"]["base"], "tuned": losses["train"]["tuned"]},
        "eval_perplexity": {k: math.exp(v) for k, v in losses["eval"].items()},
        "eval_rows": len(data["eval"]),
        "train_rows": len(splits["train"]),
        "training": {"steps": history["global_step"], "first_loss": history["loss"][0]["loss"] if history["loss"] else None,
                     "last_loss": history["loss"][-1]["loss"] if history["loss"] else None},
        "samples": samples,
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "report.md").write_text(render_report(result, cfg))
    return out_dir


def render_report(result: dict, cfg: FinetuneConfig) -> str:
    el, tl = result["eval_loss"], result["train_loss"]
    lines = [
        f"# Persona adapter report: {cfg.base_model}",
        "",
        "| split | base loss | tuned loss | change |",
        "|---|---|---|---|",
        f"| held-out ({result['eval_rows']} rows) | {el['base']:.4f} | {el['tuned']:.4f} | {el['tuned'] / el['base'] - 1:+.1%} |",
        f"| train (fixed sample of {result['train_rows']} rows) | {tl['base']:.4f} | {tl['tuned']:.4f} | {tl['tuned'] / tl['base'] - 1:+.1%} |",
        "",
        f"Training: {result['training']['steps']} optimizer steps, logged loss "
        f"{result['training']['first_loss']} -> {result['training']['last_loss']}.",
        "",
        "## Sample replies (greedy, held-out prompts)",
    ]
    for s in result["samples"]:
        lines += ["", f"**User:** {s['user']}", "", f"- tuned ({s['tuned_ended_by']}): {s['tuned']}",
                  f"- base ({s['base_ended_by']}): {s['base']}", f"- reference: {s['reference']}"]
    return "\n".join(lines) + "\n"
