"""Task logs hold what the pipeline logs, not the stdout of the libraries it calls; tokens follow the code.

`datasets` fingerprints a `.map()` function (and an in-memory table) by pickling it with dill, whose
`detect.nestedglobals` runs `dis.dis` into a captured `sys.stdout`. Under Prefect's `log_prints=True` (the
finetune flow's setting) those prints went to the task log instead: ~140 lines of bytecode in the validate and
tokenize logs of every first run, and the function's globals dropped out of the fingerprint, so a map could
reuse a stale `datasets` cache file. Both run here under a real Prefect API with `log_prints=True`.
"""
from __future__ import annotations

import dis
import re

import pytest

from tests.conftest import write_csv

OPCODES = {name for name in dis.opmap if len(name) > 3}
DIS_LINE = re.compile(r"^\s*(?:\d+\s+)?(?:>>\s*)?\d+\s+([A-Z_]+)\b")  # "  2     0 RESUME   0", "   46 LOAD_FAST ..."


def bytecode_lines(messages: list[str]) -> list[str]:
    return [line for m in messages for line in m.splitlines()
            if (match := DIS_LINE.match(line)) and match.group(1) in OPCODES]


def run_logs(flow_run_id) -> list[tuple[str | None, str]]:
    """(task run id or None, message) of every log line of one flow run, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    logs = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                       limit=200, offset=len(logs)):
            logs += page
    return [(str(log.task_run_id) if log.task_run_id else None, log.message) for log in logs]


def test_validate_and_tokenize_task_logs_hold_no_bytecode(prefect_env, tmp_path, good_rows):
    from prefect import flow

    from personatune.config import FinetuneConfig
    from personatune.files import sha256_file
    from tasks.data import tokenize_quotes, validate_quotes
    from tasks.model import resolve_base

    csv_path = write_csv(tmp_path / "q.csv", good_rows)
    config = FinetuneConfig(quotes_csv=str(csv_path), output_dir=str(tmp_path / "outputs"), eval_fraction=0.2).to_dict()

    @flow(log_prints=True)  # as flows.finetune: prints inside the flow and its tasks become log lines
    def data_stages() -> dict:
        print("prints reach the run log")
        stages: dict = {}
        base = resolve_base(config["base_model"], config["base_revision"])
        dataset_dir = validate_quotes(stages, config=config, quotes_csv=str(csv_path), csv_sha256=sha256_file(csv_path))
        tokenize_quotes(stages, config=config, dataset_dir=dataset_dir, base_model=base["path"],
                        model_fingerprint=base["fingerprint"])
        return stages

    state = data_stages(return_state=True)
    assert state.result() == {"validate": "ran", "tokenize": "ran"}  # a first run: both stages did their work
    logs = run_logs(state.state_details.flow_run_id)
    messages = [m for _, m in logs]
    assert "prints reach the run log" in messages  # log_prints is on, so library prints would have landed here
    assert any(m.startswith("stage tokenize: ran") for m in messages)
    assert len({task_run for task_run, _ in logs if task_run}) == 3  # resolve_base_model, validate, tokenize
    assert bytecode_lines(messages) == []
    assert not [m for m in messages if "LOAD_GLOBAL" in m or "RETURN_VALUE" in m]


def test_tokens_follow_a_changed_global_of_the_map_function(prefect_env, tmp_path, tokenizer, good_rows, monkeypatch):
    """The prompt template is a global that the map function reads (through format_prompt). Tokenizing the same
    split again after it changed must give the new scaffold, not `datasets`' cache of the old one; identical inputs
    give identical fingerprints, a changed limit another one."""
    from prefect import flow

    import personatune.prompt
    from personatune.data import build_dataset
    from personatune.tokenization import load_tokenized, tokenize_dataset

    dataset_dir = build_dataset(write_csv(tmp_path / "q.csv", good_rows), 0.2, tmp_path / "ds")
    files_before = sorted(p.relative_to(dataset_dir) for p in dataset_dir.rglob("*"))

    @flow(log_prints=True)
    def tokenize_twice() -> None:
        tokenize_dataset(dataset_dir, tokenizer, 256, "reject", tmp_path / "old")
        monkeypatch.setattr(personatune.prompt, "TEMPLATE", personatune.prompt.TEMPLATE.replace("### User:", "### Visitor:"))
        tokenize_dataset(dataset_dir, tokenizer, 256, "reject", tmp_path / "new")
        tokenize_dataset(dataset_dir, tokenizer, 256, "reject", tmp_path / "again")
        tokenize_dataset(dataset_dir, tokenizer, 128, "reject", tmp_path / "shorter")

    tokenize_twice()
    old, new, again, shorter = (load_tokenized(tmp_path / name)["train"] for name in ("old", "new", "again", "shorter"))
    assert "### User:" in tokenizer.decode(old[0]["input_ids"]) and "### Visitor:" not in tokenizer.decode(old[0]["input_ids"])
    assert "### Visitor:" in tokenizer.decode(new[0]["input_ids"]) and "### User:" not in tokenizer.decode(new[0]["input_ids"])
    assert again._fingerprint == new._fingerprint != shorter._fingerprint
    assert sorted(p.relative_to(dataset_dir) for p in dataset_dir.rglob("*")) == files_before  # no cache files beside it
