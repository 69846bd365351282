"""Base model resolution and the QLoRA model build."""
from __future__ import annotations

from prefect import task

from personatune.config import from_mapping
from personatune.model import BaseModelError, build_model, model_fingerprint, resolve_base_model
from tasks.caching import cached_stage


def _transient(task, task_run, state) -> bool:
    """Retry downloads and flaky file systems; a wrong path or id will not fix itself."""
    try:
        state.result()
    except BaseModelError:
        return False
    except Exception:
        return True
    return False


@task(name="resolve_base_model", retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=_transient)
def resolve_base(base_model: str, base_revision: str) -> dict:
    """Find the base model (converting the embedded GGUF once) before any heavy work; fail fast if absent."""
    resolved = resolve_base_model(base_model)
    return {"path": resolved, "fingerprint": model_fingerprint(resolved, base_revision)}


@cached_stage("build_model")
def build_qlora_model(out_dir: str, config: dict, base_model: str, model_fingerprint: str) -> str:
    """4-bit NF4 frozen base + seeded LoRA adapters; saves the initial adapter and parameter counts."""
    return str(build_model(base_model, from_mapping(config), out_dir))
