#!/usr/bin/env python3
"""Which recipe and decoding give the voice that holds on unseen topics? (QUALITY.md)

    python bench/quality_sweep.py run --base-model DIR --out bench/results/quality_sweep.json [--recipes a,b]
    python bench/quality_sweep.py score bench/results/quality_sweep.json     # similarity + table (CPU, embedder)
    python bench/quality_sweep.py decode --bundles outputs/latest --decodings "rep 1.1;rep 1.1, contrast 0.5"

`run` trains every recipe below on data/quotes.csv through the same public functions the flow calls
(build_dataset, tokenize_dataset, build_model, run_training, score_adapter) and scores base and each adapter on
the golden rows and the unseen-topic probes with every decoding setting, keeping every reply. It runs where the
GPU is (fp32 compute and the config's own layout, `profile=manual`, so the math is the CPU default's); the
sentence-embedding model need not be there: `score` adds the persona similarity afterwards on any machine.
CPU minutes in the table are the recipe's optimizer steps times the CPU seconds per step measured for its LoRA
layout (`cpu_step_s` in the results, from `python bench/quality_sweep.py cpu-step`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE = {"learning_rate": 2e-3, "epochs": 2.0, "lora_r": 8, "lora_alpha": 16, "lora_targets": "q_proj,v_proj",
            "lora_dropout": 0.05, "neftune_noise_alpha": 0.0}
RECIPES = {
    "seed-cpu-default (lr 2e-3, 2 ep)": {},
    "lr 2e-3, 1 ep": {"epochs": 1.0},
    "lr 1e-3, 1 ep": {"epochs": 1.0, "learning_rate": 1e-3},
    "lr 4e-3, 1 ep": {"epochs": 1.0, "learning_rate": 4e-3},
    "lr 1e-3, 2 ep": {"learning_rate": 1e-3},
    "r16 q,v, lr 2e-3, 1 ep": {"epochs": 1.0, "lora_r": 16, "lora_alpha": 32},
    "all-linear r8, lr 1e-3, 1 ep": {"epochs": 1.0, "learning_rate": 1e-3, "lora_targets": "all-linear"},
    "all-linear r8, lr 2e-3, 1 ep": {"epochs": 1.0, "lora_targets": "all-linear"},
    "all-linear r16, lr 1e-3, 1 ep": {"epochs": 1.0, "learning_rate": 1e-3, "lora_targets": "all-linear",
                                      "lora_r": 16, "lora_alpha": 32},
    "dropout 0, lr 2e-3, 1 ep": {"epochs": 1.0, "lora_dropout": 0.0},
    "dropout 0.1, lr 2e-3, 1 ep": {"epochs": 1.0, "lora_dropout": 0.1},
    "NEFTune 5, lr 2e-3, 1 ep": {"epochs": 1.0, "neftune_noise_alpha": 5.0},
    "all-linear r8, lr 1e-3, 2 ep": {"learning_rate": 1e-3, "lora_targets": "all-linear"},
    "all-linear r8, NEFTune 5, lr 2e-3, 1 ep": {"epochs": 1.0, "lora_targets": "all-linear", "neftune_noise_alpha": 5.0},
    "all-linear r8, lr 4e-3, 1 ep": {"epochs": 1.0, "learning_rate": 4e-3, "lora_targets": "all-linear"},
    "all-linear r8, dropout 0, lr 2e-3, 1 ep": {"epochs": 1.0, "lora_targets": "all-linear", "lora_dropout": 0.0},
    "all-linear r16, lr 2e-3, 1 ep": {"epochs": 1.0, "lora_targets": "all-linear", "lora_r": 16, "lora_alpha": 32},
    "NEFTune 5, lr 4e-3, 1 ep": {"epochs": 1.0, "learning_rate": 4e-3, "neftune_noise_alpha": 5.0},
    "dropout 0, lr 4e-3, 1 ep": {"epochs": 1.0, "learning_rate": 4e-3, "lora_dropout": 0.0},
    "dropout 0.1, lr 4e-3, 1 ep": {"epochs": 1.0, "learning_rate": 4e-3, "lora_dropout": 0.1},
    "r16 q,v, lr 4e-3, 1 ep": {"epochs": 1.0, "learning_rate": 4e-3, "lora_r": 16, "lora_alpha": 32},
    "lr 6e-3, 1 ep": {"epochs": 1.0, "learning_rate": 6e-3},
}
DECODINGS = {
    "greedy": {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
    "rep 1.1": {"repetition_penalty": 1.1, "no_repeat_ngram_size": 0},
    "rep 1.15": {"repetition_penalty": 1.15},
    "rep 1.2": {"repetition_penalty": 1.2, "no_repeat_ngram_size": 0},
    "rep 1.3": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 0},
    "no-repeat 3": {"repetition_penalty": 1.0, "no_repeat_ngram_size": 3},
    "rep 1.15 + no-repeat 4": {"repetition_penalty": 1.15, "no_repeat_ngram_size": 4},
    # Sampling, reseeded per generation batch (evaluate.generate_replies): the same adapter gives the same replies.
    # "seed N" rows score the same adapter with other seeds, to show how much a sampled number moves by luck.
    "rep 1.1, T 0.5": {"repetition_penalty": 1.1, "temperature": 0.5, "top_p": 0.9},
    "rep 1.1, T 0.7": {"repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.9},
    "rep 1.1, T 0.7, seed 1": {"repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.9, "seed": 1},
    "rep 1.1, T 0.7, seed 2": {"repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.9, "seed": 2},
    "rep 1.1, T 0.9": {"repetition_penalty": 1.1, "temperature": 0.9, "top_p": 0.95},
    "T 0.7": {"repetition_penalty": 1.0, "temperature": 0.7, "top_p": 0.9},
    # Contrast with the base (personatune.decoding, base_contrast): deterministic like greedy.
    "rep 1.1, contrast 0.3": {"repetition_penalty": 1.1, "base_contrast": 0.3},
    "rep 1.1, contrast 0.5": {"repetition_penalty": 1.1, "base_contrast": 0.5},
    "rep 1.1, contrast 0.7": {"repetition_penalty": 1.1, "base_contrast": 0.7},
    "rep 1.1, contrast 0.8": {"repetition_penalty": 1.1, "base_contrast": 0.8},
    "rep 1.1, contrast 1.0": {"repetition_penalty": 1.1, "base_contrast": 1.0},
    "rep 1.15, contrast 0.7": {"repetition_penalty": 1.15, "base_contrast": 0.7},
    "rep 1.2, contrast 0.5": {"repetition_penalty": 1.2, "base_contrast": 0.5},
    "contrast 0.5": {"repetition_penalty": 1.0, "base_contrast": 0.5},
}


def decoding(name: str) -> dict:
    """A named decoding as config overrides; the contrast with the base is off unless the name sets it (the
    config's default is on, and the rows measured before it existed had none)."""
    return {"base_contrast": 0.0, **DECODINGS[name]}


def run(args) -> None:
    import torch

    from personatune.config import FinetuneConfig
    from personatune.data import build_dataset
    from personatune.evaluate import load_scores, score_adapter
    from personatune.model import build_model, resolve_base_model
    from personatune.tokenization import load_tokenizer, tokenize_dataset
    from personatune.train import run_training

    resolved = resolve_base_model(args.base_model)
    names = [n.strip() for n in args.recipes.split(";")] if args.recipes else list(RECIPES)  # in the order given
    results = {"machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "base_model": args.base_model, "recipes": {}, "base": {}}
    if Path(args.out).is_file():
        results = json.loads(Path(args.out).read_text())
    work = Path(tempfile.mkdtemp(prefix="sweep-"))
    common = dict(base_model=args.base_model, compute_dtype="fp32", profile="manual", persona_similarity=False,
                  quotes_csv=str(ROOT / "data/quotes.csv"), golden_csv=str(ROOT / "data/golden.csv"),
                  probes_csv=str(ROOT / "data/probes.csv"))
    base_cfg = FinetuneConfig(**common, **BASELINE)
    tok = load_tokenizer(resolved)
    dataset = build_dataset(base_cfg.quotes_csv, base_cfg.eval_fraction, work / "dataset")
    tokens = tokenize_dataset(dataset, tok, base_cfg.max_seq_len, base_cfg.on_long_row, work / "tokens")
    wanted = [n.strip() for n in args.decodings.split(";")] if args.decodings else list(DECODINGS)
    for dname, dec in ((n, decoding(n)) for n in wanted):
        if dname not in results["base"]:
            results["base"][dname] = load_scores(score_adapter(base_cfg.replace(**dec), resolved, None, work / f"base-{dname}"))
    for i, name in enumerate(names):
        if name in results["recipes"]:
            continue
        cfg = base_cfg.replace(**{**BASELINE, **RECIPES[name]})
        t0 = time.time()
        init = build_model(resolved, cfg, work / f"init-{i}")
        adapter = run_training(cfg, resolved, init / "adapter", tokens, work / f"adapter-{i}")
        train_s = time.time() - t0
        history = json.loads((adapter / "history.json").read_text())
        entry = {"overrides": RECIPES[name], "config": {k: getattr(cfg, k) for k in BASELINE}, "train_s": round(train_s, 1),
                 "steps": history["global_step"], "best_step": history.get("best_step"),
                 "eval_loss_curve": history.get("eval_loss"), "decodings": {}}
        decodings = {n: decoding(n) for n in wanted}
        if args.greedy_only and name != args.decode_all:
            decodings = {"greedy": decoding("greedy")}
        elif args.decode_all and name == args.decode_all:
            decodings = {n: decoding(n) for n in DECODINGS}
        for dname, dec in decodings.items():
            entry["decodings"][dname] = load_scores(score_adapter(cfg.replace(**dec), resolved, adapter, work / f"s-{i}-{dname}"))
        results["recipes"][name] = entry
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # after each recipe: a killed run keeps its rows
        print(f"{name}: {entry['steps']} steps, {train_s:.0f} s", flush=True)


class StepTimes:
    """A TrainerCallback noting when each optimizer step ends (the final held-out evaluation is not a step)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Times(TrainerCallback):
            def __init__(self):
                self.times = []

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter())

        return _Times()


def cpu_step(args) -> None:
    """CPU seconds per optimizer step of the default layout (16 examples, packed) for q,v and all-linear LoRA."""
    import json as _json

    from personatune.config import FinetuneConfig
    from personatune.data import build_dataset
    from personatune.model import build_model, resolve_base_model
    from personatune.tokenization import load_tokenizer, tokenize_dataset
    from personatune.train import run_training

    work = Path(tempfile.mkdtemp(prefix="cpustep-"))
    out = {}
    layouts = [(t, int(r)) for t, r in (x.rsplit(" r", 1) for x in args.layouts.split(";"))]
    for targets, r in layouts:
        cfg = FinetuneConfig(base_model=args.base_model, lora_targets=targets, lora_r=r, lora_alpha=2 * r, max_steps=args.steps)
        resolved = resolve_base_model(cfg.base_model)
        ds = build_dataset(cfg.quotes_csv, cfg.eval_fraction, work / "ds")
        tokens = tokenize_dataset(ds, load_tokenizer(resolved), cfg.max_seq_len, cfg.on_long_row, work / "tok")
        init = build_model(resolved, cfg, work / f"init-{targets}-{r}")
        ends = StepTimes()
        run_training(cfg.replace(eval_every_steps=10_000), resolved, init / "adapter", tokens,
                     work / f"a-{targets}-{r}", callbacks=[ends])
        steps = sorted(b - a for a, b in zip(ends.times, ends.times[1:]))  # the first step (warm-up) is left out
        out[f"{targets} r{r}"] = round(steps[len(steps) // 2], 3)
        print(targets, r, out[f"{targets} r{r}"], "s/step", flush=True)
    Path(args.out).write_text(_json.dumps(out, indent=1) + "\n")


def score(args) -> None:
    """Persona similarity of every kept reply (offline embedder), wins vs base, and the Markdown table."""
    from personatune.metrics import paired_similarity

    path = Path(args.results)
    results = json.loads(path.read_text())
    refs = {}
    import csv

    for name in ("golden", "probes"):
        for row in csv.DictReader(open(ROOT / f"data/{name}.csv")):
            refs[(name, row["user"])] = row["response"]

    def fill(card):
        sims_all = []
        for set_name, s in card["sets"].items():
            sims = paired_similarity([r["reply"] for r in s["replies"]], [refs[(set_name, r["user"])] for r in s["replies"]])
            for r, v in zip(s["replies"], sims):
                r["similarity"] = v
            s["similarity"] = sum(sims) / len(sims)
            sims_all += sims
        card["persona_similarity"] = sum(sims_all) / len(sims_all)

    for card in results["base"].values():
        fill(card)
    for entry in results["recipes"].values():
        for dname, card in entry["decodings"].items():
            fill(card)
            base = results["base"][dname]
            for set_name, s in card["sets"].items():
                wins = [a["similarity"] > b["similarity"] for a, b in zip(s["replies"], base["sets"][set_name]["replies"])]
                s["wins_vs_base"] = sum(wins) / len(wins)
    path.write_text(json.dumps(results, indent=1) + "\n")
    cpu = json.loads(Path(args.cpu_steps).read_text()) if args.cpu_steps and Path(args.cpu_steps).is_file() else {}
    print("| recipe | decoding | steps | CPU min | golden loss | probes sim (base) | beats base | probes loop | probes distinct-2 | golden sim | all loop | run-on |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, e in results["recipes"].items():
        layout = ("all-linear" if e["config"]["lora_targets"] == "all-linear" else "q_proj,v_proj") + f" r{e['config']['lora_r']}"
        per_step = cpu.get(layout)
        for dname, c in e["decodings"].items():
            p, g, b = c["sets"]["probes"], c["sets"]["golden"], results["base"][dname]["sets"]["probes"]
            mins = f"{e['steps'] * per_step / 60:.1f}" if per_step else "n/a"
            print(f"| {name} | {dname} | {e['steps']} | {mins} | {c['golden_loss']:.4f} | {p['similarity']:.3f} "
                  f"({b['similarity']:.3f}) | {p['wins_vs_base']:.0%} | {p['loop_rate']:.1%} | {p['distinct_2']:.2f} | "
                  f"{g['similarity']:.3f} | {c['loop_rate']:.1%} | {c['run_on_rate']:.1%} |")


def pool(args) -> None:
    """Several sampled replies per prompt, from decodings that differ only in their seed: each prompt's similarity
    is the mean over its replies (the base's the same way), wins compare those means, distinct-2 is the mean over
    the reply sets, loop and run-on rates count every reply. What `reply_samples` computes inside an evaluation."""
    from personatune.metrics import distinct_n

    results = json.loads(Path(args.results).read_text())
    names = args.decodings.split(";")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"| recipe | replies per prompt | set | similarity (base) | margin | beats base | distinct-2 (per set) | loop | run-on |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for recipe, entry in results["recipes"].items():
        if any(n not in entry["decodings"] for n in names):
            continue
        for set_name in ("probes", "golden"):
            cards = [entry["decodings"][n]["sets"][set_name] for n in names]
            bases = [results["base"][n]["sets"][set_name] for n in names]
            tuned = [mean(x) for x in zip(*[[r["similarity"] for r in c["replies"]] for c in cards])]
            base = [mean(x) for x in zip(*[[r["similarity"] for r in b["replies"]] for b in bases])]
            d2 = [distinct_n([r["reply"] for r in c["replies"]], 2) for c in cards]
            replies = [r for c in cards for r in c["replies"]]
            print(f"| {recipe} | {len(names)} | {set_name} | {mean(tuned):.3f} ({mean(base):.3f}) | "
                  f"{mean(tuned) - mean(base):+.3f} | {mean([a > b for a, b in zip(tuned, base)]):.1%} | "
                  f"{mean(d2):.3f} ({', '.join(f'{x:.3f}' for x in d2)}) | "
                  f"{mean([r['loops'] for r in replies]):.1%} | {mean([r['ended_by'] != 'eos' for r in replies]):.1%} |")


def decode(args) -> None:
    """Score trained adapter bundles (a flow run's outputs/<run>/) with several decodings, on the machine at hand
    (the CPU default's own adapter on the CPU box), persona similarity included: the base once per decoding it
    sees (the contrast with the base is the adapter's, so the base decodes without it), each bundle per decoding.
    Writes every reply and prints the table; a (bundle, decoding) already in --out is kept, not scored again."""
    import torch

    from personatune.config import FinetuneConfig
    from personatune.evaluate import EvaluationModels, load_scores, score_adapter
    from personatune.inference import base_model_of
    from personatune.model import resolve_base_model
    from personatune.prompt import prompt_format_of

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"bundles": {}}
    results["machine"] = f"cpu ({torch.get_num_threads()} threads)" if not torch.cuda.is_available() else \
        torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="decode-"))
    names = [n.strip() for n in args.decodings.split(";")]
    for b, bundle in enumerate(x.strip() for x in args.bundles.split(";")):
        fmt = prompt_format_of(bundle)
        cfg = FinetuneConfig(base_model=base_model_of(Path(bundle)), prompt_format=fmt)
        resolved = resolve_base_model(cfg.base_model)
        entry = results["bundles"].setdefault(bundle, {"prompt_format": fmt, "base": {}, "decodings": {}})
        models = EvaluationModels()
        try:
            for name in names:
                if name in entry["decodings"]:
                    continue  # kept from an earlier call (the results file is read first): only the table again
                dec = cfg.replace(**decoding(name))
                base_key = json.dumps({k: v for k, v in decoding(name).items() if k != "base_contrast"}, sort_keys=True)
                if base_key not in entry["base"]:
                    entry["base"][base_key] = load_scores(score_adapter(dec, resolved, None, work / f"b{b}-{name}", models))
                started = time.perf_counter()
                card = load_scores(score_adapter(dec, resolved, bundle, work / f"a{b}-{name}", models))
                card["wall_s"] = round(time.perf_counter() - started, 1)
                card["base_key"] = base_key
                entry["decodings"][name] = card
                out.write_text(json.dumps(results, indent=1) + "\n")
                print(f"{bundle} {name}: {card['seconds']}", flush=True)
        finally:
            models.close()
    print("| bundle | decoding | probes sim (base) | beats base | loop | run-on | distinct-2 | golden sim (base) | "
          "golden beats base | golden distinct-2 | s to score |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for bundle, entry in results["bundles"].items():
        for name, card in entry["decodings"].items():
            base = entry["base"][card["base_key"]]
            cells = []
            for set_name in ("probes", "golden"):
                mine, theirs = card["sets"][set_name], base["sets"][set_name]
                wins = [a["similarity"] > c["similarity"] for a, c in zip(mine["replies"], theirs["replies"])]
                cells.append((mine, theirs, sum(wins) / len(wins)))
            (p, pb, pw), (g, gb, gw) = cells
            print(f"| {Path(bundle).name} ({entry['prompt_format']}) | {name} | {p['similarity']:.3f} "
                  f"({pb['similarity']:.3f}) | {pw:.0%} | {p['loop_rate']:.1%} | {p['run_on_rate']:.1%} | "
                  f"{p['distinct_2']:.3f} | {g['similarity']:.3f} ({gb['similarity']:.3f}) | {gw:.0%} | "
                  f"{g['distinct_2']:.3f} | {card['wall_s']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--base-model", default="embedded:smollm2-135m-instruct")
    r.add_argument("--out", default=str(ROOT / "bench/results/quality_sweep.json"))
    r.add_argument("--recipes", default="", help="';'-separated recipe names (default: all)")
    r.add_argument("--greedy-only", action="store_true", help="score only greedy decoding, except --decode-all")
    r.add_argument("--decode-all", default="", help="the recipe scored with every decoding")
    r.add_argument("--decodings", default="", help="';'-separated decoding names for base and recipes (default: all)")
    c = sub.add_parser("cpu-step")
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--base-model", default="embedded:smollm2-135m-instruct")
    c.add_argument("--layouts", default="q_proj,v_proj r8;all-linear r8;all-linear r16", help="';'-separated 'targets rN'")
    c.add_argument("--out", default=str(ROOT / "bench/results/cpu_step.json"))
    s = sub.add_parser("score")
    s.add_argument("results")
    s.add_argument("--cpu-steps", default=str(ROOT / "bench/results/cpu_step.json"))
    pl = sub.add_parser("pool", help="several sampled replies per prompt from same-decoding rows of other seeds")
    pl.add_argument("results")
    pl.add_argument("--decodings", default="rep 1.1, T 0.7;rep 1.1, T 0.7, seed 1;rep 1.1, T 0.7, seed 2")
    d = sub.add_parser("decode", help="score trained bundles with several decodings (persona similarity included)")
    d.add_argument("--bundles", required=True, help="';'-separated bundle folders (outputs/<run>)")
    d.add_argument("--decodings", default="rep 1.1;rep 1.1, contrast 0.3;rep 1.1, contrast 0.5;rep 1.1, contrast 1.0")
    d.add_argument("--out", default=str(ROOT / "bench/results/quality_decode.json"))
    args = ap.parse_args()
    {"run": run, "cpu-step": cpu_step, "score": score, "pool": pool, "decode": decode}[args.cmd](args)


if __name__ == "__main__":
    main()
