"""The fine-tune flow: validate -> tokenize -> build model -> train -> evaluate -> release -> publish (+ export).

The new adapter (challenger) goes live only if it is not worse than the live one (champion) on fixed evaluation
sets; either way its complete bundle is kept (README, "Releases: champion, challenger, rollback").

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

_temporary_api = None
if __name__ == "__main__":  # a local run: Prefect's temporary API server boots while the ML libraries import
    from flows.startup import start_temporary_api

    _temporary_api = start_temporary_api()

from personatune.bundle import default_run_name
from personatune.config import FinetuneConfig, add_config_arguments, check_paths, config_from_args, from_mapping
from personatune.files import code_version
from tasks.data import fetch_data, tokenize_quotes, validate_quotes
from tasks.export import export_run
from tasks.evaluate import EvaluationModels, adapter_sha256, evaluate_lora, score_model
from tasks.model import build_qlora_model, resolve_base
from tasks.publish import publish_bundle, push_to_hub
from tasks.release import find_champion, judge_challenger, pending_entry, release_bundle, same_adapter
from tasks.train import train_lora


def finetune(**params) -> dict:
    cfg = from_mapping(params)  # the same validation as CLI flags: types, ranges, known names
    check_paths(cfg)
    config = cfg.to_dict()
    log = get_run_logger()
    stages: dict[str, str] = {}

    base = resolve_base(cfg.base_model, cfg.base_revision)
    model = {"base_model": base["path"], "model_fingerprint": base["fingerprint"]}
    data = fetch_data(config)  # hf:// and s3:// CSVs: downloaded once per content; local paths as they are
    csv_sha256 = data["quotes_csv"]["sha256"]
    # the evaluation stages read the local copies of golden_csv and probes_csv
    eval_config = {**config, **{k: data[k]["path"] for k in ("golden_csv", "probes_csv")}}
    champion = find_champion(config, base["fingerprint"])  # the live adapter (outputs/latest or the Hub's main)

    # 1. data -> 2. tokens -> 3. QLoRA model -> 4. training -> 5. evaluation (base, champion, challenger) -> release
    dataset_dir = validate_quotes(stages, config=config, quotes_csv=data["quotes_csv"]["path"], csv_sha256=csv_sha256)
    tokenized_dir = tokenize_quotes(stages, config=config, dataset_dir=dataset_dir, **model)
    model_dir = build_qlora_model(stages, config=config, **model)
    adapter_dir = train_lora(stages, config=config, init_adapter=model_dir, tokenized_dir=tokenized_dir, **model)
    # an unchanged re-run trains the champion's own adapter: nothing to compare (and everything stays cached)
    rival = None if not champion or same_adapter(champion["path"], adapter_dir) else champion["path"]
    eval_sets = {"golden": data["golden_csv"]["sha256"], "probes": data["probes_csv"]["sha256"]}
    shared = EvaluationModels()  # the base loads once for the scores and the evaluation
    try:
        scores = {role: score_model(stages if role == "challenger" else None, config=eval_config, adapter_dir=path,
                                    adapter_sha256=adapter_sha256(path), eval_sha256=eval_sets, models=shared, **model)
                  for role, path in (("base", None), ("champion", rival), ("challenger", adapter_dir))
                  if role == "base" or path}
        eval_dir = evaluate_lora(stages, config=eval_config, adapter_dir=adapter_dir, tokenized_dir=tokenized_dir,
                                 scores=scores, champion_dir=rival, models=shared, **model)
    finally:
        shared.close()
    release = judge_challenger(config, eval_dir, dataset_dir, champion, adapter_dir)
    provenance = {"data_sha256": csv_sha256, "base_model_fingerprint": base["fingerprint"],
                  "code_version": code_version(), "stages": stages, "eval_sets_sha256": eval_sets,
                  "data_sources": {k: v["source"] for k, v in data.items() if v["source"]},
                  "stage_dirs": {"dataset": dataset_dir, "tokenized": tokenized_dir, "model": model_dir,
                                 "adapter": adapter_dir, "eval": eval_dir, "scores": scores}}
    run_dir = publish_bundle(config, cfg.run_name or default_run_name(csv_sha256), adapter_dir, eval_dir, provenance,
                             release)
    exports = export_run(config, run_dir, base["path"])  # merged/, gguf/, Modelfile when export_formats asks
    # the Hub first (release/<run>; main only if promoted), then outputs/latest: a failed push moves nothing
    entry = pending_entry(run_dir, release)  # this run's line of outputs/releases.json (the card shows it too)
    hub = push_to_hub(config, run_dir, release["verdict"]["promoted"], entry)
    entry = release_bundle(config, run_dir, release, entry, hub)  # records the run; latest moves only if promoted
    release["verdict"].update(promoted=entry["verdict"] == "promoted", reason=entry["reason"])

    summary = {"run_dir": run_dir, "hub": hub, "stages": stages, "exports": exports, "verdict": release["verdict"],
               "diff": release["diff"], **json.loads((Path(eval_dir) / "eval.json").read_text())}
    log.info("\n%s", format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    m = summary["metrics"]
    roles = [r for r in ("base", "champion", "challenger") if r in m]

    def three(key: str, fmt: str) -> str:
        return " -> ".join(f"{r} {'n/a' if m[r].get(key) is None else fmt.format(m[r][key])}" for r in roles)

    probes = m["challenger"].get("probes", {})
    lines = [
        f"Verdict: {summary['verdict']['reason']}",
        f"Adapter bundle: {summary['run_dir']}" + ("" if summary["verdict"]["promoted"] else " (not live)"),
        f"Hub: {summary['hub']['message'] if summary.get('hub') else 'not pushed'}",
        "Stages: " + ", ".join(f"{k} {v}" for k, v in summary["stages"].items()),
        f"Golden loss:        {three('golden_loss', '{:.4f}')}",
        f"Persona similarity: {three('persona_similarity', '{:.3f}')}",
        f"Unseen-topic probes: beats base {_pct(probes.get('wins_vs_base'))}, loop rate {_pct(probes.get('loop_rate'))}, "
        f"distinct-2 {probes.get('distinct_2', 0):.2f}; run-on rate (all) {m['challenger']['run_on_rate']:.0%}",
        f"Held-out loss (this CSV): {three('heldout_loss', '{:.4f}')}",
    ]
    if summary.get("diff"):
        d = summary["diff"]
        lines.append(f"Data since the champion: {d['added']} added, {d['removed']} removed, {d['edited']} edited")
    for s in summary["samples"]:
        lines.append(f"  User: {s['user']}\n  Reply: {s['tuned']}")
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


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
    if _temporary_api is not None:
        _temporary_api.join()  # the server answers (or failed to start: then the flow starts it as before)
    try:
        finetune(**cfg.to_dict())
    except Exception as e:  # the flow already logged the traceback; end with the one line that matters
        print(f"\nfine-tune failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
