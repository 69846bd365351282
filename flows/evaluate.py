"""Evaluate any persona adapter on the current data, without training.

    python -m flows.evaluate                                   # outputs/latest on data/quotes.csv + probes
    python -m flows.evaluate --adapter you/wednesday-adapter --revision main --out eval-hub/

Same metrics as the flow's evaluate stage (held-out loss base vs tuned, persona similarity, run-on rate,
length, distinct-n): eval.json, report.md and eval_plot.png in `--out`.
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
    p.add_argument("--probes-csv", default="data/probes.csv", help="Probe prompts (empty to skip).")
    p.add_argument("--max-new-tokens", type=int, default=64, help="Generation limit (default: 64).")
    p.add_argument("--out", default="eval", help="Folder for eval.json, report.md, eval_plot.png (default: eval).")
    args = p.parse_args(argv)

    import transformers

    from personatune.config import FinetuneConfig
    from personatune.data import DataValidationError, build_dataset
    from personatune.evaluate import evaluate_adapter
    from personatune.inference import base_model_of, locate_adapter
    from personatune.model import BaseModelError, resolve_base_model
    from personatune.tokenization import load_tokenizer, tokenize_dataset

    transformers.utils.logging.disable_progress_bar()
    if Path(args.out).exists():
        print(f"evaluate: {args.out} already exists; choose another --out or remove it", file=sys.stderr)
        return 2
    try:
        adapter_dir = locate_adapter(args.adapter, args.revision, args.outputs)
        cfg = FinetuneConfig(base_model=args.base_model or base_model_of(adapter_dir), quotes_csv=args.quotes_csv,
                             eval_fraction=args.eval_fraction, probes_csv=args.probes_csv, max_new_tokens=args.max_new_tokens)
        resolved = resolve_base_model(cfg.base_model)
        with tempfile.TemporaryDirectory() as work:
            dataset = build_dataset(cfg.quotes_csv, cfg.eval_fraction, Path(work) / "dataset")
            tokens = tokenize_dataset(dataset, load_tokenizer(resolved, cfg.base_revision), cfg.max_seq_len,
                                      cfg.on_long_row, Path(work) / "tokens", quotes_csv=cfg.quotes_csv)
            out = evaluate_adapter(cfg, resolved, adapter_dir, tokens, dataset, args.out)
    except (FileNotFoundError, DataValidationError, BaseModelError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    print((Path(out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
