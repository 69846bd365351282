"""BENCHMARKS.md's tables are what bench/tables.py prints from bench/results/*.json, so the document cannot drift
from the result files; a file reconstructed from printed output says where from; bench.py's raw output prints as
bench.py prints it."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import tables  # noqa: E402  (bench/tables.py)

BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")


def test_every_table_in_benchmarks_is_printed_from_its_result_file():
    assert tables.problems(BENCHMARKS) == []
    names = [name for name, _ in tables.blocks(BENCHMARKS)]
    assert sorted(names) == sorted(tables.TABLES), "a result file without its table in BENCHMARKS.md, or the reverse"


def test_an_edited_number_or_a_table_without_a_file_is_caught():
    edited = BENCHMARKS.replace("| 8,683 |", "| 8,684 |", 1)
    assert edited != BENCHMARKS
    assert tables.problems(edited) == ["block 'h200_bench_run4' differs from what bench/tables.py prints from bench/results/"]
    loose = BENCHMARKS + "\n| variant | tokens/s |\n|---|---:|\n| gpu | 99,999 |\n"
    assert [p.split(":")[0] for p in tables.problems(loose)] == ["table line outside a bench/tables.py block"] * 3
    assert tables.rewrite(edited) == BENCHMARKS


def test_reconstructed_results_name_their_source_and_versions():
    for name in tables._run_files():
        data = tables.load(name)
        if "results" in data:  # raw bench.py output carries its own setup (versions, card)
            assert data["setup"]["versions"] and data["command"], name
            continue
        assert data["source"].startswith("reconstructed from the table"), name
        assert set(data["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes"}, name
        assert all(set(row) == set(data["columns"]) for row in data["rows"]), name


def test_targets_are_computed_from_the_printed_cells():
    targets = tables.bench_targets()
    # gpu@24GiB over seed, printed per run (run 4: 8,683 / 539 -> 16.1x) and against run 2's seed, the best (662 tok/s)
    assert "16.1x (run 4), 19.3x (run 5), 17.7x (run 3)" in targets
    assert f"{8683 / 662:.1f}x, {11224 / 662:.1f}x, {8632 / 662:.1f}x" in targets
    assert "**met** against the same run's seed in 3 of 3 runs (against the best seed: 1 of 3)" in targets  # 15x row
    multi = tables.multi_gpu_targets()
    assert "1.78x (9,898 -> 17,612 tok/s)" in multi and "| **not met** |" in multi
    assert f"({100 * (8.699 - 8.341) / 8.699:.1f}% lower)" in multi


def test_raw_bench_output_prints_as_bench_py_prints_it(tmp_path):
    """A `bench.py run --out` file: tables.py prints bench.py's own paragraph and table from it."""
    plan = {"micro_batch_size": 16, "grad_accum": 1, "packing": True, "attention": "varlen", "checkpoint_layers": 0,
            "total_layers": 32, "lean_head": True, "compile": True, "dequantized_base": True}
    seed_plan = {**plan, "micro_batch_size": 4, "grad_accum": 4, "packing": False, "attention": "sdpa",
                 "checkpoint_layers": 32, "lean_head": False, "compile": False, "dequantized_base": False}

    def result(name, plan, step_s):  # 2 warm-up + 4 timed steps of 1,000 real tokens each
        return {"name": name, "plan": plan, "steps": 6, "seconds": 4 * step_s, "step_s": step_s, "tokens_per_step": 1000,
                "tok_s": 1000 / step_s, "step_times": [3.0, 3.0] + [step_s] * 4, "peak_alloc_gib": 17.4,
                "peak_reserved_gib": 17.8, "loss_first": 11.5, "loss_last": 8.25}

    raw = {"command": "bench/bench.py run --warmup 2 --steps 4", "date": "2026-11-29", "warmup": 2, "steps": 4,
           "meta": {"stats": {"train": {"rows": 308, "tokens": 19483}}},
           "setup": {"vocab": 49152, "bf16_matmul_tflops": 750.0, "torch": "2.11.0+cu130",
                     "versions": {"transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.50.2"}},
           "results": [result("seed", seed_plan, 1.0), result("gpu", plan, 0.1)]}
    text = tables.raw_bench_table(raw)
    assert "2 warm-up + 4 timed optimizer steps" in text and "torch 2.11.0+cu130, transformers 5.17.0" in text
    gpu = next(line for line in text.splitlines() if line.startswith("| gpu |"))
    cells = [c.strip() for c in gpu.strip("|").split("|")]
    assert cells[2:5] == ["10,000", "10.0", "10,000 (10.0)"]  # tokens/s, x seed, median step
    assert cells[-2] == f"{3 * 19483 / 10000:.0f} s (+{3.0 + 3.0 - 2 * 0.1:.0f} s)"  # 3 epochs, plus the warm-up's cost


def test_flow_gpu_reads_each_stages_time_from_the_prefect_log():
    import datetime as dt

    import flow_gpu  # bench/flow_gpu.py

    started = dt.datetime.combine(dt.date.today(), dt.time(10, 0, 0)).timestamp()
    lines = ["10:00:05.000 | INFO    | prefect.engine - Beginning flow run 'x' for flow 'finetune'",
             "10:00:06.500 | INFO    | Task run 'validate-0123456789' - Finished in state Completed()",
             "Training layout: profile gpu: 16 examples x 1 accumulation",
             "10:00:08.000 | INFO    | Task run 'tokenize-abcdef0123' - Finished in state Completed()",
             "10:00:20.000 | INFO    | Task run 'build_model-abcdef0123' - Finished in state Completed()",
             "10:00:40.000 | INFO    | Task run 'train-abcdef0123' - Finished in state Completed()",
             "10:00:45.000 | INFO    | Task run 'score-abcdef0123' - Finished in state Completed()",
             "10:00:49.000 | INFO    | Task run 'score-9876543210' - Finished in state Completed()",
             "10:00:55.000 | INFO    | Task run 'evaluate-abcdef0123' - Finished in state Completed()",
             "10:00:55.500 | INFO    | Task run 'judge_challenger-1a2' - Finished in state Completed()",
             "10:00:57.000 | INFO    | Flow run 'x' - Finished in state Completed()"]
    assert flow_gpu.stage_times(lines, started) == {"start-up": 5.0, "validate": 1.5, "tokenize": 1.5,
                                                    "build_model": 12.0, "train": 20.0, "score": 9.0,
                                                    "evaluate": 6.0, "publish": 2.0}
