"""Evaluation: held-out loss of base vs tuned, persona metrics on generated replies, a report and a plot.

Replies stop *during generation*: EOS and the scaffold marker `###` are stop criteria handed to
`generate()`, so the model never spends tokens writing the next `### User:` turn; `cut_reply` only strips the
marker that triggered the stop. The report also shows the run-on rate with EOS alone (the seed's setting, which
relied on trimming text afterwards), to make the stop criteria's effect visible.
Everything is greedy and seeded: two evaluations of the same adapter give the same numbers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from personatune.config import FinetuneConfig
from personatune.files import atomic_dir, is_complete
from personatune.metrics import centroid_similarity, paired_similarity, reply_stats
from personatune.prompt import STOP_STRINGS, cut_reply, format_prompt
from personatune.tokenization import IGNORE_INDEX, load_tokenized, load_tokenizer
from personatune.train import collator

TRAIN_LOSS_ROWS = 64  # train loss is measured on the first 64 training rows (a fixed sample)
GENERATION_BATCH = 32  # measured on the 2-core CPU: 32 prompts x 48 tokens took 10.6 s in one batch, 16.8 s in two


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
def generate_replies(model, tok, prompts: list[tuple[str, str]], max_new_tokens: int = 64, stop_markers: bool = True,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, streamer=None,
                     batch_size: int = GENERATION_BATCH) -> list[dict]:
    """Replies to (instruction, user) prompts, batched with left padding.

    Each result says why generation ended: `eos`, `marker` (the `###` stop string) or `length`. With
    stop_markers=False only EOS stops generation (the seed's behaviour).
    """
    model.eval()
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  do_sample=do_sample, use_cache=True, streamer=streamer)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stop_markers:
        kwargs.update(stop_strings=STOP_STRINGS, tokenizer=tok)
    results = []
    side = tok.padding_side
    tok.padding_side = "left"  # generation appends on the right, so prompts are padded on the left
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            inputs = tok([format_prompt(i, u) for i, u in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**inputs, **kwargs)
            for (instruction, user), row in zip(chunk, out[:, inputs["input_ids"].shape[1]:].tolist()):
                results.append(_describe(tok, instruction, user, row))
    finally:
        tok.padding_side = side
    return results


def _describe(tok, instruction: str, user: str, new_tokens: list[int]) -> dict:
    eos = tok.eos_token_id
    end = new_tokens.index(eos) if eos in new_tokens else len(new_tokens)
    raw = tok.decode(new_tokens[:end], skip_special_tokens=True)
    if "###" in raw:
        ended_by = "marker"  # stopped by the stop string (what follows is padding) or wrote one before EOS
    elif end < len(new_tokens):
        ended_by = "eos"
    else:
        ended_by = "length"
    return {"instruction": instruction, "user": user, "reply": cut_reply(raw), "raw": raw,
            "new_tokens": end + (end < len(new_tokens)), "ended_by": ended_by}


def generate_reply(model, tok, instruction: str, user: str, max_new_tokens: int = 64, **kwargs) -> dict:
    return generate_replies(model, tok, [(instruction, user)], max_new_tokens, **kwargs)[0]


def load_probes(path: str | Path) -> list[tuple[str, str]]:
    import pandas as pd

    if not path:
        return []
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return list(zip(df["instruction"], df["user"]))


def evaluate_adapter(cfg: FinetuneConfig, resolved: str, adapter_dir: str | Path, tokenized_dir: str | Path,
                     dataset_dir: str | Path, out_dir: str | Path) -> Path:
    """Write eval.json, report.md and eval_plot.png to `out_dir`."""
    from datasets import load_from_disk

    from personatune.model import dequantize_frozen_base, load_qlora_model

    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(resolved, cfg.base_revision)
    data = load_tokenized(tokenized_dir)
    model = load_qlora_model(resolved, cfg, adapter_dir=str(adapter_dir), trainable=False)
    if not torch.cuda.is_available():
        dequantize_frozen_base(model)  # same logits, ~3x faster generation on a CPU

    # Train loss on a fixed sample keeps evaluation fast on a CPU; the held-out split is used whole.
    splits = {"eval": data["eval"], "train": data["train"].select(range(min(TRAIN_LOSS_ROWS, len(data["train"]))))}
    losses = {}
    for split, rows in splits.items():
        with model.disable_adapter():
            base = mean_loss(model, rows, tok)
        losses[split] = {"base": base, "tuned": mean_loss(model, rows, tok)}

    text = load_from_disk(str(dataset_dir))
    held_out = list(zip(text["eval"]["instruction"], text["eval"]["user"]))
    references = list(text["eval"]["response"])
    probes = load_probes(cfg.probes_csv)
    generations = {"tuned": generate_replies(model, tok, held_out + probes, cfg.max_new_tokens)}
    with model.disable_adapter():
        generations["base"] = generate_replies(model, tok, held_out + probes, cfg.max_new_tokens)
    eos_only = generate_replies(model, tok, held_out + probes, cfg.max_new_tokens, stop_markers=False)

    persona = {}
    sim = cfg.persona_similarity  # off: no embedding model is loaded, the metric is reported as skipped
    for name, gens in generations.items():
        held, probe = gens[:len(held_out)], gens[len(held_out):]
        persona[name] = {
            "similarity_heldout": _mean(paired_similarity([g["reply"] for g in held], references)) if sim else None,
            "similarity_probes": _mean(centroid_similarity([g["reply"] for g in probe], list(text["train"]["response"])))
            if probe and sim else None,
            **reply_stats(gens),
        }
    result = {
        "eval_loss": {"base": losses["eval"]["base"], "tuned": losses["eval"]["tuned"]},
        "train_loss": {"base": losses["train"]["base"], "tuned": losses["train"]["tuned"]},
        "eval_perplexity": {k: math.exp(v) for k, v in losses["eval"].items()},
        "eval_rows": len(data["eval"]),
        "train_rows": len(splits["train"]),
        "probe_prompts": len(probes),
        "persona": persona,
        "run_on_rate_eos_only": reply_stats(eos_only)["run_on_rate"],
        "training": _training_summary(Path(adapter_dir) / "history.json"),
        "samples": [
            {"instruction": i, "user": u, "reference": ref, "tuned": t["reply"], "tuned_ended_by": t["ended_by"],
             "base": b["reply"], "base_ended_by": b["ended_by"]}
            for (i, u), ref, t, b in list(zip(held_out, references, generations["tuned"], generations["base"]))[:cfg.num_samples]
        ],
        "probe_replies": [{"user": u, "tuned": t["reply"], "base": b["reply"]}
                          for (_, u), t, b in zip(probes, generations["tuned"][len(held_out):], generations["base"][len(held_out):])],
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_eval(result, Path(adapter_dir) / "history.json", tmp / "eval_plot.png")
        (tmp / "report.md").write_text(render_report(result, cfg))
    return out_dir


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _training_summary(history_path: Path) -> dict:
    if not history_path.is_file():  # an adapter from elsewhere (the Hub) may come without its history
        return {"steps": None, "first_loss": None, "last_loss": None, "resumed_from": None}
    history = json.loads(history_path.read_text())
    losses = history["loss"]
    return {"steps": history["global_step"], "first_loss": losses[0]["loss"] if losses else None,
            "last_loss": losses[-1]["loss"] if losses else None, "resumed_from": history.get("resumed_from")}


def plot_eval(result: dict, history_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads(history_path.read_text())["loss"] if history_path.is_file() else []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot([h["step"] for h in history], [h["loss"] for h in history], color="black")
    ax1.set(title="training loss (response tokens)", xlabel="optimizer step", ylabel="loss")
    metrics = [("held-out loss", result["eval_loss"]),
               ("persona similarity", {k: result["persona"][k]["similarity_heldout"] for k in ("base", "tuned")}),
               ("run-on rate", {k: result["persona"][k]["run_on_rate"] for k in ("base", "tuned")})]
    metrics = [(n, v) for n, v in metrics if v["base"] is not None]  # persona similarity may be switched off
    names = [n for n, _ in metrics]
    base, tuned = [v["base"] for _, v in metrics], [v["tuned"] for _, v in metrics]
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], base, width=0.4, label="base", color="silver")
    ax2.bar([i + 0.2 for i in x], tuned, width=0.4, label="tuned", color="black")
    ax2.set_xticks(list(x), names)
    ax2.set_title("base vs tuned")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def render_report(result: dict, cfg: FinetuneConfig) -> str:
    el, tl, pb, pt = result["eval_loss"], result["train_loss"], result["persona"]["base"], result["persona"]["tuned"]
    ppl = result["eval_perplexity"]
    probes = pt["similarity_probes"] is not None

    def row(name, b, t, fmt="{:.3f}"):
        return f"| {name} | {fmt.format(b)} | {fmt.format(t)} |"

    lines = [
        f"# Persona adapter report: {cfg.base_model}",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        row(f"held-out loss ({result['eval_rows']} rows, per response token)", el["base"], el["tuned"], "{:.4f}"),
        row("held-out perplexity", ppl["base"], ppl["tuned"], "{:.2f}"),
        row(f"train loss (fixed sample of {result['train_rows']} rows)", tl["base"], tl["tuned"], "{:.4f}"),
        row("persona similarity, held-out (cosine to reference)", pb["similarity_heldout"], pt["similarity_heldout"])
        if pb["similarity_heldout"] is not None else "| persona similarity | skipped (`persona_similarity` off) | skipped |",
        *([row(f"persona similarity, {result['probe_prompts']} probes (cosine to persona centroid)",
               pb["similarity_probes"], pt["similarity_probes"])] if probes else []),
        row("run-on rate (marker written or token limit hit)", pb["run_on_rate"], pt["run_on_rate"], "{:.1%}"),
        row("mean reply length (words)", pb["mean_words"], pt["mean_words"], "{:.1f}"),
        row("distinct-1", pb["distinct_1"], pt["distinct_1"], "{:.2f}"),
        row("distinct-2", pb["distinct_2"], pt["distinct_2"], "{:.2f}"),
        "",
        f"Tuned/base held-out loss: {el['tuned'] / el['base']:.3f}. Run-on rate of the tuned model with EOS as the "
        f"only stop criterion (no `###` stop string): {result['run_on_rate_eos_only']:.1%}; with the stop criteria: "
        f"{pt['run_on_rate']:.1%}.",
        "",
        f"Training: {result['training']['steps']} optimizer steps, logged loss "
        f"{result['training']['first_loss']} -> {result['training']['last_loss']}.",
        "",
        "![training loss and base vs tuned](eval_plot.png)",
        "",
        "## Sample replies (greedy, held-out prompts)",
    ]
    for s in result["samples"]:
        lines += ["", f"**User:** {s['user']}", "", f"- tuned ({s['tuned_ended_by']}): {s['tuned']}",
                  f"- base ({s['base_ended_by']}): {s['base']}", f"- reference: {s['reference']}"]
    return "\n".join(lines) + "\n"
