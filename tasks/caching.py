"""Content-addressed stage outputs with Prefect caching.

Each stage writes into `<output_dir>/.cache/<stage>/<key>/`, where `key` hashes the stage's inputs: upstream
folders (themselves content-addressed), the CSV's sha256, the base model's fingerprint, the config fields
the stage depends on, and the hash of the `personatune` source the stage runs (its entry modules and
everything they import: an edit to the evaluation code keeps the trained adapter). The same key is the Prefect cache key, and
the task returns the folder path. A cache entry whose folder is gone (or incomplete) is not trusted: the
task is run with `refresh_cache=True` and rebuilds it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.logging import get_run_logger

from personatune.files import code_version, is_complete, stable_hash

# Which config fields each stage's output depends on; a change to any other field keeps the cache.
MODEL_FIELDS = ("base_revision", "load_in_4bit", "compute_dtype", "lora_r", "lora_alpha", "lora_dropout",
                "lora_targets", "seed")
STAGE_FIELDS = {
    "validate": ("eval_fraction",),
    "tokenize": ("base_revision", "max_seq_len", "on_long_row", "prompt_format"),
    "build_model": MODEL_FIELDS + ("gradient_checkpointing",),
    "train": MODEL_FIELDS + ("epochs", "max_steps", "learning_rate", "warmup_ratio", "micro_batch_size",
                             "grad_accum", "optim", "packing", "gradient_checkpointing", "profile", "compile",
                             "num_gpus", "neftune_noise_alpha", "eval_every_steps", "early_stopping_patience",
                             "prompt_format"),  # the format decides the chat_template.jinja saved with the adapter
    "score": ("base_revision", "load_in_4bit", "compute_dtype", "seed", "max_new_tokens", "repetition_penalty",
              "no_repeat_ngram_size", "temperature", "top_p", "base_contrast", "reply_samples", "persona_similarity",
              "prompt_format"),
    "evaluate": MODEL_FIELDS + ("num_samples", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size",
                                "temperature", "top_p", "base_contrast", "reply_samples",
                                "golden_csv", "probes_csv", "persona_similarity", "prompt_format"),
}
# The ML-core modules each stage runs; their imports are followed (personatune.files.module_closure). The ranks
# of a multi-GPU run start as `python -m personatune.train_rank`, which no import names: listed here.
STAGE_MODULES = {
    "validate": ("personatune.data",),
    "tokenize": ("personatune.tokenization",),
    "build_model": ("personatune.model",),
    "train": ("personatune.train", "personatune.distributed", "personatune.train_rank"),
    "score": ("personatune.evaluate",),
    "evaluate": ("personatune.evaluate",),
}
# callbacks observe or inject faults; models (the evaluation's loaded base) saves loads: neither changes an output
NOT_HASHED = ("out_dir", "config", "callbacks", "models")
# Inputs named by content elsewhere in the key (a score's adapter by its sha256), so where they lie does not matter.
# The CSV is named by its sha256, so the same content from a local path, a Hub dataset repo or a bucket (downloaded
# to a cache folder) validates once.
NOT_HASHED_PER_STAGE = {"score": ("adapter_dir",), "validate": ("quotes_csv",)}


def stage_key(stage: str, params: dict[str, Any]) -> str:
    inputs = {k: v for k, v in params.items() if k not in NOT_HASHED + NOT_HASHED_PER_STAGE.get(stage, ())}
    settings = {f: params["config"][f] for f in STAGE_FIELDS[stage]}
    return stable_hash(stage, code_version(*STAGE_MODULES[stage]), inputs, settings)[:24]


def stage_dir(stage: str, params: dict[str, Any]) -> Path:
    return Path(params["config"]["output_dir"]) / ".cache" / stage / stage_key(stage, params)


def cached_stage(stage: str, **task_options: Any) -> Callable:
    """Decorate `fn(out_dir, config, **inputs) -> str` into a cached Prefect task called with keywords.

    Calling the result runs the task (or takes its cache hit), logs whether it was cached and returns the
    output folder. `stages`, when given, records `{stage: "cached" | "ran"}` for the run summary.
    """
    def decorate(fn: Callable) -> Callable:
        prefect_task = task(
            name=stage,
            cache_key_fn=lambda context, params: stage_key(stage, params),
            persist_result=True,
            **task_options,
        )(fn)

        @functools.wraps(fn)
        def run(stages: dict | None = None, **params: Any) -> str:
            out_dir = stage_dir(stage, params)
            refresh = not is_complete(out_dir)
            # the run is named after its cache folder (<stage>-<key prefix>), so the UI says where its output is
            named = prefect_task.with_options(refresh_cache=refresh, task_run_name=f"{stage}-{out_dir.name[:10]}")
            state = named(out_dir=str(out_dir), return_state=True, **params)
            result = state.result()  # raises the task's exception if it failed
            cached = state.name == "Cached"
            get_run_logger().info("stage %s: %s (%s)", stage, "cached" if cached else "ran", result)
            if stages is not None:
                stages[stage] = "cached" if cached else "ran"
            return result

        run.task = prefect_task
        return run

    return decorate
