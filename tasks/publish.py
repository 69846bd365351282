"""The final task: assemble the adapter bundle in outputs/<run>/ (and, later, push it to the Hub)."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from personatune.bundle import write_bundle
from personatune.config import from_mapping


@task(name="publish", retries=2, retry_delay_seconds=[2, 10])
def publish_bundle(config: dict, run_name: str, adapter_dir: str, eval_dir: str, provenance: dict) -> str:
    """Write the bundle atomically, point outputs/latest at it, and attach the report as an artifact."""
    run_dir = write_bundle(from_mapping(config), run_name, adapter_dir, eval_dir, provenance)
    create_markdown_artifact(key="eval-report", markdown=(run_dir / "report.md").read_text(),
                             description=f"Evaluation of the persona adapter in {run_dir}")
    return str(run_dir)
