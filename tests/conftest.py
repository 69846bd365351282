"""Shared fixtures. Tests run offline on the embedded model; Prefect state goes to a temp folder."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUOTES = ROOT / "data" / "quotes.csv"
# The first 8 rows of data/golden.csv and data/probes.csv: the evaluation's code paths at a sixth of the CPU time.
TINY_EVAL_SETS = {"golden_csv": str(ROOT / "tests" / "data" / "golden_small.csv"),
                  "probes_csv": str(ROOT / "tests" / "data" / "probes_small.csv")}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def write_csv(path: Path, rows: list[list[str]], header=("instruction", "user", "response")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def good_rows() -> list[list[str]]:
    return [
        ["Respond as Wednesday Addams.", f"Question number {i} about the weather?",
         f"The forecast for day {i} is bleak, like everything I enjoy."]
        for i in range(40)
    ]


@pytest.fixture(scope="session")
def base_model_dir() -> str:
    """The embedded SmolLM2-135M converted once to safetensors (cached across sessions)."""
    from personatune.model import resolve_base_model

    return resolve_base_model("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from personatune.tokenization import load_tokenizer

    return load_tokenizer(base_model_dir)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A real (temporary) Prefect API with its state and result storage in a temp folder."""
    home = tmp_path_factory.mktemp("prefect")
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_LOCAL_STORAGE_PATH", str(home / "storage"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield home
    mp.undo()
