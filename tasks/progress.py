"""What a run shows in the Prefect UI while it trains: a progress artifact, a loss table, a useful run name.

`PrefectTrainingCallback` is a `transformers.TrainerCallback` (pass it to `train_adapter(..., callbacks=[...])`):

- a progress artifact (key `training-progress`) that moves from 0 to 100 % as optimizer steps complete,
  updated at most once per `min_interval_s` (and always at the end);
- every logged training loss, published at the end of training as a table artifact (key `loss-history`:
  step, epoch, loss, learning rate).

Outside a Prefect run (a notebook, a benchmark) it does nothing, so the ML core never depends on Prefect.
Artifact calls that fail (a server hiccup) are logged and never fail the training.

`flow_run_label()` names fine-tune flow runs after their data and base model, e.g.
`smollm2-135m-instruct@70af8535` (base model, first 8 hex digits of the CSV's sha256).
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)

PROGRESS_KEY = "training-progress"
LOSS_TABLE_KEY = "loss-history"


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class PrefectTrainingCallback(TrainerCallback):
    """Report training progress and loss to Prefect artifacts of the current task/flow run."""

    def __init__(self, description: str = "", min_interval_s: float = 2.0):
        self.description = description
        self.min_interval_s = min_interval_s
        self.losses: list[dict[str, Any]] = []
        self.progress_id = None
        self._last_update = 0.0
        self._enabled = _in_prefect_run()

    # -- helpers ----------------------------------------------------------------------------------------
    def _percent(self, state) -> float:
        total = state.max_steps or 0
        return round(100.0 * min(state.global_step, total) / total, 1) if total > 0 else 0.0

    def _describe(self, state) -> str:
        text = f"step {state.global_step}/{state.max_steps}"
        if self.losses:
            text += f", loss {self.losses[-1]['loss']:.4f}"
        return f"{self.description}: {text}" if self.description else text

    def _safely(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # an artifact is a report, never a reason to lose a training run
            log.warning("could not %s: %s", what, e)
            return None

    def _update(self, state, force: bool = False) -> None:
        if not self._enabled:
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        now = time.monotonic()
        if not force and now - self._last_update < self.min_interval_s:
            return
        self._last_update = now
        if self.progress_id is None:
            self.progress_id = self._safely("create the progress artifact", create_progress_artifact,
                                            progress=self._percent(state), key=PROGRESS_KEY,
                                            description=self._describe(state))
        else:
            self._safely("update the progress artifact", update_progress_artifact, artifact_id=self.progress_id,
                         progress=self._percent(state), description=self._describe(state))

    # -- TrainerCallback hooks --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._update(state, force=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append({"step": state.global_step, "epoch": round(float(state.epoch or 0.0), 4),
                                "loss": round(float(logs["loss"]), 6),
                                "learning_rate": float(logs.get("learning_rate") or 0.0)})

    def on_step_end(self, args, state, control, **kwargs):
        self._update(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._update(state, force=True)
        if self._enabled and self.losses:
            from prefect.artifacts import create_table_artifact

            self._safely("create the loss table", create_table_artifact, table=self.losses, key=LOSS_TABLE_KEY,
                         description=f"Training loss per optimizer step ({self.description or 'LoRA'})")


def flow_run_label() -> str:
    """`<base model>@<data hash>` for the running fine-tune flow (a `flow_run_name` callable)."""
    from prefect.runtime import flow_run

    try:
        params = flow_run.parameters or {}
        from personatune.config import FinetuneConfig

        defaults = FinetuneConfig()
        csv = str(params.get("quotes_csv") or defaults.quotes_csv)
        base = str(params.get("base_model") or defaults.base_model)
        from personatune.files import sha256_file
        from personatune.sources import is_remote

        if is_remote(csv):  # no download for a name: the revision a pinned URL names (@<sha>, ?versionId=)
            pinned = re.search(r"@([0-9a-f]{8})|versionId=([^&]{8})", csv)
            data = next(g for g in pinned.groups() if g) if pinned else csv.split("://", 1)[0]
        else:
            data = sha256_file(csv)[:8] if Path(csv).is_file() else "no-data"
        short = base.split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1] or base
        return f"{short}@{data}"
    except Exception as e:  # a name is cosmetic: never fail the run over it
        log.warning("could not build the flow run name: %s", e)
        return "finetune"
