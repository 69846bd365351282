"""The fine-tune flow: validate -> tokenize -> build model -> train -> evaluate -> publish.

    python -m flows.finetune                        # embedded SmolLM2-135M, CPU-friendly defaults
    python -m flows.finetune --base-model meta-llama/Llama-2-7b-hf --config my.yaml
    python -m flows.finetune --help                 # every option; the same names are flow parameters
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

# Before Prefect reads its settings: the temporary API server may take >20 s to start on a busy 2-core box,
# and offline machines should not try to send telemetry.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow  # noqa: E402
from prefect.logging import get_run_logger  # noqa: E402

from personatune.bundle import default_run_name
from personatune.config import FinetuneConfig, add_config_arguments, check_paths, config_from_args, from_mapping
from personatune.files import code_version, sha256_file
from tasks.data import tokenize_quotes, validate_quotes
from tasks.evaluate import evaluate_lora
from tasks.model import build_qlora_model, resolve_base
from tasks.publish import publish_bundle, push_to_hub
from tasks.train import train_lora


def finetune(**params) -> dict:
    cfg = from_mapping(params)  # the same validation as CLI flags: types, ranges, known names
    check_paths(cfg)
    config = cfg.to_dict()
    log = get_run_logger()
    stages: dict[str, str] = {}

    base = resolve_base(cfg.base_model, cfg.base_revision)
    model = {"base_model": base["path"], "model_fingerprint": base["fingerprint"]}
    csv_sha256 = file_sha256(cfg.quotes_csv)

    # 1. data -> 2. tokens -> 3. QLoRA model -> 4. training -> 5. evaluation -> publish
    dataset_dir = validate_quotes(stages, config=config, quotes_csv=cfg.quotes_csv, csv_sha256=csv_sha256)
    tokenized_dir = tokenize_quotes(stages, config=config, dataset_dir=dataset_dir, **model)
    model_dir = build_qlora_model(stages, config=config, **model)
    adapter_dir = train_lora(stages, config=config, init_adapter=model_dir, tokenized_dir=tokenized_dir, **model)
    eval_dir = evaluate_lora(stages, config=config, adapter_dir=adapter_dir, tokenized_dir=tokenized_dir,
                             dataset_dir=dataset_dir, probes_sha256=file_sha256(cfg.probes_csv), **model)
    provenance = {"data_sha256": csv_sha256, "base_model_fingerprint": base["fingerprint"],
                  "code_version": code_version(), "stages": stages,
                  "stage_dirs": {"dataset": dataset_dir, "tokenized": tokenized_dir, "model": model_dir,
                                 "adapter": adapter_dir, "eval": eval_dir}}
    run_dir = publish_bundle(config, cfg.run_name or default_run_name(csv_sha256), adapter_dir, eval_dir, provenance)
    hub = push_to_hub(config, run_dir)  # gate, then one commit to --hub-repo; without a repo: stays local

    summary = {"run_dir": run_dir, "hub": hub, "stages": stages,
               **json.loads((Path(eval_dir) / "eval.json").read_text())}
    log.info("\n%s", format_summary(summary))
    return summary


def file_sha256(path: str) -> str:
    return sha256_file(path) if path and Path(path).is_file() else "missing"


def format_summary(summary: dict) -> str:
    el, tl = summary["eval_loss"], summary["train_loss"]
    lines = [
        f"Adapter bundle: {summary['run_dir']}",
        f"Hub: {summary['hub']['message'] if summary.get('hub') else 'not pushed'}",
        "Stages: " + ", ".join(f"{k} {v}" for k, v in summary["stages"].items()),
        f"Held-out loss: base {el['base']:.4f} -> tuned {el['tuned']:.4f}",
        f"Train loss:    base {tl['base']:.4f} -> tuned {tl['tuned']:.4f}",
        ("Persona similarity (held-out): base {:.3f} -> tuned {:.3f}; ".format(
            summary["persona"]["base"]["similarity_heldout"], summary["persona"]["tuned"]["similarity_heldout"])
         if summary["persona"]["base"]["similarity_heldout"] is not None else "Persona similarity: skipped; ")
        + "run-on rate base {:.0%} -> tuned {:.0%}".format(
            summary["persona"]["base"]["run_on_rate"], summary["persona"]["tuned"]["run_on_rate"]),
    ]
    for s in summary["samples"]:
        lines.append(f"  User: {s['user']}\n  Reply: {s['tuned']}")
    return "\n".join(lines)


def _flow_signature() -> tuple[inspect.Signature, str]:
    """Flow parameters are the config fields: same names, types, defaults and help as the CLI flags."""
    defaults = FinetuneConfig()
    types = {"str": str, "int": int, "float": float, "bool": bool}
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, f.name),
                                annotation=types[f.type]) for f in fields(FinetuneConfig)]
    doc = "Fine-tune a persona LoRA adapter: validate, tokenize, build the QLoRA model, train, evaluate, publish.\n\nArgs:\n"
    doc += "".join(f"    {f.name}: {f.metadata['help']}\n" for f in fields(FinetuneConfig))
    return inspect.Signature(params, return_annotation=dict), doc


finetune.__signature__, finetune.__doc__ = _flow_signature()
finetune.__annotations__ = {p.name: p.annotation for p in finetune.__signature__.parameters.values()}
from tasks.progress import flow_run_label  # noqa: E402  (runs are named <base model>@<data hash>)
finetune = flow(name="finetune", log_prints=True, flow_run_name=flow_run_label)(finetune)


def quiet_loading_bars() -> None:
    """Keep the terminal for the training progress bar: no per-tensor loading or per-map bars."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    quiet_loading_bars()
    try:
        finetune(**cfg.to_dict())
    except Exception as e:  # the flow already logged the traceback; end with the one line that matters
        print(f"\nfine-tune failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
