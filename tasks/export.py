"""The optional export task: merged weights, GGUF and an Ollama Modelfile, written into the run's bundle.

It runs after the bundle is written and before the Hub push, so one Hub commit holds the adapter and its exports.
"""
from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from personatune.config import from_mapping
from personatune.export import export_bundle


@task(name="export")
def export_run(config: dict, run_dir: str, base_model: str) -> dict:
    """`export_formats` of the config into `run_dir` (merged/, gguf/, Modelfile); {} when none is asked."""
    cfg = from_mapping(config)
    if not cfg.export_formats:
        return {}
    return export_bundle(run_dir, cfg.export_formats, base_model=base_model, log=get_run_logger().info)
