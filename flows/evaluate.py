"""Evaluate any persona adapter on the current data, without training.

    python -m flows.evaluate                                   # outputs/latest on data/quotes.csv + probes
    python -m flows.evaluate --adapter you/wednesday-adapter --revision main --out eval-hub/

Same metrics as the flow's evaluate stage (golden loss, persona similarity, unseen-topic probes, loop and run-on
rates, held-out loss of the CSV; base vs this adapter, and a champion with --champion): eval.json, report.md,
eval_plot.png and generation_config.json in `--out`. Decoding: the adapter's generation_config.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from personatune.inference import add_adapter_arguments

    p = argparse.ArgumentParser(prog="python -m flows.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_arguments(p)
    p.add_argument("--quotes-csv", default="data/quotes.csv", help="CSV whose held-out split is evaluated.")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="Held-out share, as in training (default: 0.1).")
    p.add_argument("--golden-csv", default="data/golden.csv", help="Golden evaluation rows (empty to skip).")
    p.add_argument("--probes-csv", default="data/probes.csv", help="Unseen-topic probes (empty to skip).")
    p.add_argument("--champion", help="Also evaluate this adapter folder as the champion (three columns).")
    p.add_argument("--max-new-tokens", type=int, default=64, help="Generation limit (default: 64).")
    p.add_argument("--out", default="eval", help="Folder for eval.json, report.md, eval_plot.png (default: eval).")
    args = p.parse_args(argv)

    import transformers

    from personatune.config import FinetuneConfig
    from personatune.data import DataValidationError, build_dataset
    from personatune.decoding import load_decoding
    from personatune.evaluate import EvaluationModels, evaluate_adapter, score_adapter
    from personatune.inference import base_model_of, locate_adapter
    from personatune.prompt import prompt_format_of
    from personatune.model import BaseModelError, resolve_base_model
    from personatune.tokenization import load_tokenizer, tokenize_dataset

    transformers.utils.logging.disable_progress_bar()
    if Path(args.out).exists():
        print(f"evaluate: {args.out} already exists; choose another --out or remove it", file=sys.stderr)
        return 2
    try:
        adapter_dir = locate_adapter(args.adapter, args.revision, args.outputs)
        decoding = load_decoding(adapter_dir)  # the adapter's own decoding (generation_config.json)
        cfg = FinetuneConfig(base_model=args.base_model or base_model_of(adapter_dir), quotes_csv=args.quotes_csv,
                             eval_fraction=args.eval_fraction, golden_csv=args.golden_csv, probes_csv=args.probes_csv,
                             max_new_tokens=args.max_new_tokens, repetition_penalty=decoding.repetition_penalty,
                             no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                             temperature=decoding.temperature, top_p=decoding.top_p,
                             base_contrast=decoding.base_contrast,
                             prompt_format=prompt_format_of(adapter_dir))  # prompted as it was trained
        resolved = resolve_base_model(cfg.base_model)
        with tempfile.TemporaryDirectory() as work:
            dataset = build_dataset(cfg.quotes_csv, cfg.eval_fraction, Path(work) / "dataset")
            tokens = tokenize_dataset(dataset, load_tokenizer(resolved, cfg.base_revision), cfg.max_seq_len,
                                      cfg.on_long_row, Path(work) / "tokens", quotes_csv=cfg.quotes_csv,
                                      prompt_format=cfg.prompt_format)
            roles = {"base": None, "challenger": adapter_dir, **({"champion": args.champion} if args.champion else {})}
            shared = EvaluationModels()  # one load of the base for every role and the report
            try:
                scores = {role: score_adapter(cfg, resolved, path, Path(work) / f"scores-{role}", shared)
                          for role, path in roles.items()}
                out = evaluate_adapter(cfg, resolved, adapter_dir, tokens, scores, args.out,
                                       champion_dir=args.champion, models=shared)
            finally:
                shared.close()
    except (FileNotFoundError, DataValidationError, BaseModelError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    print((Path(out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
