#!/usr/bin/env python3
"""The tables of BENCHMARKS.md, printed from the result files in bench/results/.

    python bench/tables.py                       # every table, each after its marker line
    python bench/tables.py --check BENCHMARKS.md # exit 1 (with a diff) if a table there differs from its file
    python bench/tables.py --write BENCHMARKS.md # rewrite the tables there from the files

In BENCHMARKS.md each generated table sits between `<!-- bench/tables.py NAME -->` and `<!-- end bench/tables.py -->`;
NAME is one of TABLES below. tests/test_bench_tables.py checks that every table in BENCHMARKS.md is such a block and
equals what this script prints, so the document cannot drift from the files.

Two kinds of file feed it:
- raw output: the JSON that `bench/bench.py run --out DIR` writes (`bench.json`, with `setup`, `results`, `meta`);
  its table is printed by bench.py's own `fmt_table`, so a new run needs no code here.
- reconstructed: the GPU runs of 2026-11-28 kept no raw JSON, only the tables their scripts printed, committed to
  BENCHMARKS.md. Those files hold the printed paragraph and cells as they were, and say in `source` from which commit;
  numbers read from them (targets below) are the printed, rounded ones.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN = "<!-- bench/tables.py {} -->"
END = "<!-- end bench/tables.py -->"
LEFT_ALIGNED = {"variant", "layout", "layout per GPU", "target", "reached", "status", "run", "code", "record",
                "card", "result"}


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def num(cell: str) -> float:
    """The first number of a printed cell: '8,683' -> 8683, '578 (1.0)' -> 578, '30.5%' -> 30.5."""
    return float(re.match(r"-?[\d,]*\.?\d+", cell.strip()).group().replace(",", ""))


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if c in LEFT_ALIGNED else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def printed_table(d: dict) -> str:
    table = markdown(d["columns"], [[r[c] for c in d["columns"]] for r in d["rows"]])
    return (d["description"] + "\n\n" + table) if d.get("description") else table


def raw_bench_table(d: dict) -> str:
    """A `bench.py run --out` file: the paragraph and table exactly as bench.py prints them."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench

    return bench.describe_run(d["setup"], d["meta"], d["warmup"], d["steps"]) + "\n" + bench.fmt_table(
        d["setup"], d["results"], d["meta"])


def run_table(name: str) -> str:
    d = load(name)
    return raw_bench_table(d) if "results" in d else printed_table(d)


def _row(d: dict, variant: str) -> dict:
    return next(r for r in d["rows"] if r["variant"] == variant)


def bench_targets(run_names: tuple[str, ...] = ("h200_bench_run4", "h200_bench_run5", "h200_bench_run3")) -> str:
    """The issue-5 targets, judged on the runs of the final code (compiled layers, dequantized weights)."""
    runs = [load(n) for n in run_names]
    every = [load(p.stem) for p in sorted(RESULTS.glob("h200_bench_run*.json"))]
    best = max(every, key=lambda d: num(_row(d, "seed")["real tokens/s"]))
    best_seed = num(_row(best, "seed")["real tokens/s"])
    tag = lambda d: f"run {d['run']}"

    def speed(variant: str, floor: float) -> tuple[str, int, int]:
        own = [num(_row(d, variant)["x seed"]) for d in runs]
        vs_best = [num(_row(d, variant)["real tokens/s"]) / best_seed for d in runs]
        text = ", ".join(f"{x:.1f}x ({tag(d)})" for x, d in zip(own, runs)) + (
            f"; against the best seed of any run ({best_seed:,.0f} tok/s, {tag(best)}): "
            + ", ".join(f"{x:.1f}x" for x in vs_best))
        return text, sum(x >= floor for x in own), sum(x >= floor for x in vs_best)

    def memory(variant: str) -> tuple[float, float]:
        return (max(num(_row(d, variant)["peak alloc GiB"]) for d in runs),
                max(num(_row(d, variant)["peak reserved GiB"]) for d in runs))

    n = len(runs)
    rows = []
    text, own, vs_best = speed("gpu@24GiB", 10)
    alloc, reserved = memory("gpu@24GiB")
    fits = alloc <= 24 and reserved <= 24
    rows.append(["GPU default >= 10x seed, <= 24 GiB", f"`gpu@24GiB`: {text}; peak {alloc:.2f} GiB alloc, {reserved:.2f} GiB reserved",
                 f"{'**met**' if own == n and fits else '**not met**'} against the same run's seed in {own} of {n} runs "
                 f"(against the best seed: {vs_best} of {n}); memory {'met' if fits else 'not met'}"])
    text, own, vs_best = speed("gpu", 15)
    rows.append(["same default >= 15x on a large card", f"`gpu` on the {runs[0]['card_memory_gib']} GiB card: {text}",
                 f"{'**met**' if own == n else '**not met**'} against the same run's seed in {own} of {n} runs "
                 f"(against the best seed: {vs_best} of {n})"])
    _, own, _ = speed("low-memory", 3)
    low_ok = all(num(_row(d, "low-memory")["peak alloc GiB"]) <= num(_row(d, "seed")["peak alloc GiB"])
                 and num(_row(d, "low-memory")["peak reserved GiB"]) <= num(_row(d, "seed")["peak reserved GiB"]) for d in runs)
    alloc, reserved = memory("low-memory")
    seed_alloc, seed_reserved = memory("seed")
    ratios = ", ".join(f"{num(_row(d, 'low-memory')['x seed']):.1f}x ({tag(d)})" for d in runs)
    rows.append(["low-memory: peak <= seed, >= 3x", f"{ratios}; peak {alloc:.2f} GiB alloc / {reserved:.2f} reserved "
                 f"vs seed {seed_alloc:.2f} / {seed_reserved:.2f}",
                 f"{'**met**' if own == n and low_ok else '**not met**'} in {own if low_ok else 0} of {n} runs"])
    vocab = {int(re.search(r"vocab (\d+)", d["description"]).group(1)) for d in runs}
    rows.append(["vocabulary matches the bench data's tokenizer (SmolLM2, 49,152)", ", ".join(f"{v:,}" for v in sorted(vocab)),
                 "met" if vocab == {49152} else "**not met**"])
    return markdown(["target", "reached", "status"], rows)


def multi_gpu_targets(name: str = "h200x2_multi_gpu_run4") -> str:
    """The issue-8 targets, judged on one multi-GPU run's printed table."""
    d = load(name)
    one, many = d["rows"][0], d["rows"][-1]
    speedup = num(many["x 1 GPU"])
    loss_col = next(c for c in d["columns"] if c.startswith("loss step 1 -> "))
    last_step = loss_col.rsplit(" ", 1)[1]
    a, b = (float(r[loss_col].split("->")[1]) for r in (one, many))
    rel = abs(b - a) / a
    rows = [[f"{many['GPUs']} GPUs >= 1.8x one GPU's tokens/s",
             f"{speedup:.2f}x ({one['real tokens/s']} -> {many['real tokens/s']} tok/s), one run",
             "met" if speedup >= 1.8 else "**not met**"],
            ["same loss curve within 5% (per optimizer step)",
             f"step {last_step}: {b:.3f} on {many['GPUs']} GPUs vs {a:.3f} on 1 ({100 * rel:.1f}% "
             f"{'lower' if b < a else 'higher'}); the other steps' losses were not kept with this run",
             f"last step {'within' if rel <= 0.05 else 'outside'} 5%; the curve: **not established** by this file"]]
    return markdown(["target", "reached", "status"], rows)


def _run_files() -> list[str]:
    """Result files that are one run's table: reconstructed (`columns`) or bench.py's raw output (`results`)."""
    names = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and ("columns" in data or isinstance(data.get("results"), list)):
            names.append(path.stem)
    return names


FLOW_STAGES = ("start-up", "validate", "tokenize", "build_model", "train", "score", "evaluate", "publish")


def flow_runs() -> str:
    """Whole `python -m flows.finetune` runs on one H200 whose full logs are kept (bench/results/flow_h200/): the
    seconds of each stage, read by bench/flow_gpu.py's `stage_times` (both score stages summed)."""
    import datetime as dt

    sys.path.insert(0, str(ROOT / "bench"))
    import flow_gpu

    meta = json.loads((RESULTS / "flow_h200" / "runs.json").read_text(encoding="utf-8"))
    rows = []
    for r in meta["runs"]:
        lines = (RESULTS / "flow_h200" / r["log"]).read_text(encoding="utf-8").splitlines()
        last = [m.group(1) for m in map(flow_gpu.LOG_LINE.match, lines) if m][-1]
        end = dt.datetime.combine(dt.date.fromisoformat(meta["date"]), dt.time.fromisoformat(last)).timestamp()
        stages = flow_gpu.stage_times(lines, end - r["process_s"])
        rows.append([r["log"].removesuffix(".log"), r["code"], f"{r['process_s']:.1f}"]
                    + [f"{stages.get(k, 0.0):.1f}" for k in FLOW_STAGES])
    return markdown(["run", "code", "process s", *FLOW_STAGES], rows)


def flow_result(run: dict, failed: str) -> str:
    """ok, stopped at the per-run limit, or `failed` (how the table words a failure) for one bench/flow_gpu.py run."""
    return "ok" if run["ok"] else ("stopped at the per-run limit" if run["returncode"] == "timeout" else failed)


def flow_gpu_records() -> str:
    """`bench/flow_gpu.py` records (bench/results/flow_gpu_*.json): per card size, whether the flow finished, its
    training time and the out-of-memory back-off's retries, and the error of a run that failed."""
    rows = []
    for path in sorted(RESULTS.glob("flow_gpu_*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if "devices" in record:
            continue  # the later format: flow_gpu_cards
        for r in record["runs"]:
            error = next((l.strip()[:110] for l in reversed(r["tail"]) if "fine-tune failed" in l), "")
            result = flow_result(r, f"failed: {error}")
            train = r["stages_s"].get("train")
            rows.append([path.stem.removeprefix("flow_gpu_"), r["name"], f"{r['process_s']:.0f}",
                         "-" if train is None else f"{train:.1f}", str(len(r["oom_retries"])), result])
    return markdown(["record", "card", "process s", "train s", "OOM retries", "result"], rows)


def short_layout(layout: str) -> str:
    """'16 x 1, ckpt 30/32, 4-bit' from a Training layout line."""
    import re

    batch = re.search(r"(\d+) examples x (\d+) accumulation", layout)
    ckpt = re.search(r"checkpointing (off|\d+/\d+)", layout)
    frozen = "dequantized" if "frozen weights dequantized" in layout else "4-bit"
    return f"{batch.group(1)} x {batch.group(2)}, ckpt {ckpt.group(1)}, {frozen}" if batch and ckpt else layout[:40]


def flow_gpu_cards() -> str:
    """`bench/flow_gpu.py` records with the GPUs they ran on (the format since 2026-11-29 13:00): per run, the card
    size (cap), whether its Prefect home was new or a shared one an earlier run had created, whether the kept 4-bit
    copy of the base existed or the run wrote it ("-": not recorded by that version of the bench), the stages' seconds,
    the Trainer's own train_runtime, the out-of-memory retries and the layouts (the plan's, then each back-off's)."""
    import re

    rows = []
    for path in sorted(RESULTS.glob("flow_gpu_*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if "devices" not in record:
            continue
        for r in record["runs"]:
            s = r["stages_s"]
            runtime = next((m.group(1) for t in r.get("train_steps", [])
                            for m in [re.search(r"'train_runtime': '([\d.]+)'", t)] if m), None)
            result = flow_result(r, f"failed ({r['returncode']})")
            gpus = f"{r.get('num_gpus', 1)} ({'flow pins' if record['devices'] == 'unset' else 'GPU ' + record['devices']})"
            layouts = [short_layout(l) for l in r["layouts"]]
            rows.append([path.stem.removeprefix("flow_gpu_"), f"{r['cap_gib']:g} GiB" if r["cap_gib"] else "uncapped",
                         gpus, r.get("prefect_home", "new"), r.get("quantized_copy", "-"), result,
                         f"{r['process_s']:.0f}"]
                        + [f"{s[k]:.1f}" if k in s else "-" for k in ("start-up", "train")]
                        + [runtime or "-"] + [f"{s[k]:.1f}" if k in s else "-" for k in ("score", "evaluate")]
                        + [str(len(r["oom_retries"])), " -> ".join(dict.fromkeys(layouts))])
    return markdown(["record", "card", "GPUs", "Prefect home", "4-bit copy", "result", "process s", "start-up s", "train stage s",
                     "train_runtime s", "score s", "evaluate s", "OOM retries", "layout (plan -> back-off)"], rows)


def multi_gpu_logs(folder: str = "h200x2_multi_gpu_20261129") -> str:
    """`bench/multi_gpu.py run` runs whose JSON was never written, read from their kept output (mg<run>.log): the
    lines "1 GPU (...): <tok/s> tok/s, step <s> s, losses [...]" and "2 GPUs (...): ..."; a run whose N-GPU part
    printed no such line is shown as failed."""
    import re

    line = re.compile(r"^(\d+) GPUs? \(\d+ s\): (\d+) tok/s, step ([\d.]+) s, losses \[([^\]]*)\]")
    rows = []
    for log in sorted((RESULTS / folder).glob("mg*.log")):
        run = log.stem.removeprefix("mg")
        found = {}
        for text in log.read_text(encoding="utf-8").splitlines():
            m = line.match(text)
            if m:
                found[int(m.group(1))] = (float(m.group(2)), float(m.group(3)), [float(x) for x in m.group(4).split(",")])
        for n in (1, 2):
            if n not in found:
                rows.append([run, str(n), "failed (see below)", "-", "-", "-"])
                continue
            tok_s, step_s, losses = found[n]
            rows.append([run, str(n), f"{tok_s:,.0f}", f"{tok_s / found[1][0]:.2f}", f"{step_s:.3f}",
                         f"{losses[0]:.3f} -> {losses[-1]:.3f}"])
    return markdown(["run", "GPUs", "real tokens/s", "x 1 GPU", "s / step", "loss step 1 -> 15"], rows)


def multi_gpu_runs(prefix: str = "multi_gpu_2gpu_20261130-00") -> str:
    """`bench/multi_gpu.py run --gpus 2` records (raw JSON): tokens/s and step time on 1 and 2 GPUs, the speed-up."""
    rows = []
    for path in sorted(RESULTS.glob(f"{prefix}*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        one, many = d["one"], d["many"]
        rows.append([f"`{path.stem.rsplit('-', 1)[-1]}`", f"{one['tok_s']:,.0f} ({one['step_s']:.3f})",
                     f"{many['tok_s']:,.0f} ({many['step_s']:.3f})", f"{d['speedup']:.2f}"])
    return markdown(["run", "1 GPU tok/s (s / step)", "2 GPUs tok/s (s / step)", "x 1 GPU"], rows)


def multi_gpu_sweep_nosync(prefix: str = "multi_gpu_sweep_nosync_20261130") -> str:
    """`bench/multi_gpu.py sweep` records with the variants without host syncs (1gpu-nosync, ddp-nosync: the Trainer's
    NaN/inf filter off, bitsandbytes' optimizer step without its per-parameter synchronize) beside the stock ones."""
    rows = []
    for path in sorted(RESULTS.glob(f"{prefix}*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        v = d["variants"]
        for name in ("1gpu", "1gpu-nosync", "ddp", "ddp-nosync"):
            if name in v and "tok_s" in v[name]:
                one = v["1gpu-nosync" if name == "ddp-nosync" else "1gpu"]
                rows.append([f"`{path.stem.removeprefix(prefix)}`", name, str(v[name]["gpus"]), f"{v[name]['tok_s']:,.0f}",
                             f"{v[name]['step_s']:.4f}",
                             f"{v[name]['tok_s'] / one['tok_s']:.2f}" if name.startswith("ddp") else "-"])
    return markdown(["sweep", "variant", "GPUs", "real tokens/s", "s / step", "x its 1-GPU variant"], rows)


def multi_gpu_profile(name: str = "multi_gpu_2gpu_20261130-001010") -> str:
    """The step profile of a `multi_gpu.py run --profile-steps N` record, per profiled optimizer step: 1 GPU and each
    rank (bench.step_profile: GPU kernels only, NCCL apart; the host's cudaStreamSynchronize when among its top ops)."""
    d = load(name)
    runs = [("1 GPU", d["one"]["profile"])] + [(f"2 GPUs, rank {k}", d["many"]["profiles"][k])
                                                for k in sorted(d["many"]["profiles"], key=int)]
    rows = []
    for label, prof in runs:
        tokens = prof["tokens_per_step"]
        sync = next((o["ms_per_step"] for o in prof["top_host"] if o["op"] == "cudaStreamSynchronize"), None)
        rows.append([label, f"{min(tokens):,}-{max(tokens):,}", f"{prof['wall_ms_per_step']:.1f}",
                     f"{prof['compute_ms_per_step']:.1f}", f"{prof['nccl_ms_per_step']:.1f}",
                     "-" if sync is None else f"{sync:.1f}"])
    return markdown(["run", "tokens / step", "wall ms", "GPU kernels ms (not NCCL)",
                     "NCCL kernels ms (incl. waiting for the other rank)", "host cudaStreamSynchronize ms"], rows)


def graph_decode_gpu() -> str:
    """bench/graph_decode_gpu.py on two machines: generate() (warm: the faster of its runs after the first) against
    the CUDA-graph loop (every run), 136 prompts, and how many replies have the same text."""
    rows = []
    for machine, name in (("machine 1", "graph_decode_gpu_20261130"), ("machine 2", "graph_decode_gpu_20261130b")):
        r = load(name)
        for label, side in (("with the contrast", "contrast"), ("the base alone", "base")):
            warm = sorted(r[k] for k in r if k.startswith(f"generate_{side}_") and not k.endswith("_0"))
            graph = [r[k] for k in sorted(r) if re.fullmatch(f"graph_{side}_\\d", k)]
            same = sorted({r[k] for k in r if k.startswith(f"graph_{side}_same_raw_")})
            rows.append([f"{machine}, {label}", f"{warm[0]:.2f} s ({r[f'generate_{side}_0']:.2f} s first)",
                         f"{min(graph):.2f}-{max(graph):.2f} s", "/".join(map(str, same)) + f"/{r['prompts']}"])
    return markdown(["run", "generate(), warm", "graph replays", "same text"], rows)


def load_gpu() -> str:
    """bench/load_gpu.py records: per machine and repeat, each way of loading the 7B-shaped base ready for inference
    (seconds to a dequantized model, peak memory allocated) and whether it held the first way's weights bit for bit
    (checked on the first repeat)."""
    rows = []
    for path in sorted(RESULTS.glob("load_gpu_*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        for run in record["runs"]:
            same = run.get("same_as_4bit+dequant") or ({"bf16+roundtrip": run["bitwise_equal"]}
                                                       if "bitwise_equal" in run else {})
            for label, t in run.items():
                if isinstance(t, dict) and "total_s" in t:
                    bits = "reference" if label == "4bit+dequant" else (
                        {True: "yes", False: "NO"}[same[label]] if label in same else "-")
                    rows.append([f"{path.stem.removeprefix('load_gpu_')} ({record['card']})", str(run["repeat"]),
                                 label, f"{t['total_s']:.2f}", f"{t['peak_gib']:.2f}", bits])
    return markdown(["record", "repeat", "load", "seconds", "peak GiB", "same weights bit for bit"], rows)


# block name -> function printing it: one table per run file (named as the file), and the targets judged on them
TABLES = {**{name: (lambda name=name: run_table(name)) for name in _run_files()},
          "bench_targets": bench_targets, "multi_gpu_targets": multi_gpu_targets, "flow_h200": flow_runs,
          "flow_gpu_records": flow_gpu_records, "flow_gpu_cards": flow_gpu_cards,
          "multi_gpu_logs": multi_gpu_logs, "multi_gpu_runs": multi_gpu_runs, "multi_gpu_profile": multi_gpu_profile,
          "multi_gpu_runs_no_host_syncs": lambda: multi_gpu_runs("multi_gpu_2gpu_20261130-0[34]"),
          "multi_gpu_runs_s11": lambda: multi_gpu_runs("multi_gpu_2gpu_20261130-092"),
          "multi_gpu_sweep_nosync": multi_gpu_sweep_nosync, "graph_decode_gpu": graph_decode_gpu,
          "load_gpu": load_gpu}


def _segments(text: str) -> list[tuple[str | None, str]]:
    """The text cut at the markers: (None, plain text) and (name, block content) in order. Line-based, so an
    empty block never swallows the next one."""
    out: list[tuple[str | None, str]] = []
    plain: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.fullmatch(r"<!-- bench/tables\.py (\S+) -->", lines[i])
        if not m:
            plain.append(lines[i])
            i += 1
            continue
        end = next((k for k in range(i + 1, len(lines)) if lines[k] == END or lines[k].startswith("<!-- bench/tables.py ")), None)
        if end is None or lines[end] != END:
            raise ValueError(f"block {m.group(1)!r} has no {END} before the next block or the end")
        out.append((None, "\n".join(plain + [lines[i]])))
        out.append((m.group(1), "\n".join(lines[i + 1:end])))
        plain = [lines[end]]
        i = end + 1
    out.append((None, "\n".join(plain)))
    return out


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, content) of every generated block in a Markdown text."""
    return [(name, content) for name, content in _segments(text) if name is not None]


def problems(text: str) -> list[str]:
    """What is wrong with the tables of a Markdown text: a block that differs from its file, an unknown block name,
    a table line outside every block. Empty when the document is what the result files say."""
    out = []
    for name, content in _segments(text):
        if name is None:
            out += [f"table line outside a bench/tables.py block: {line[:80]}" for line in content.split("\n")
                    if line.startswith("|")]
        elif name not in TABLES:
            out.append(f"block {name!r}: no such table (bench/tables.py TABLES)")
        elif content != TABLES[name]():
            out.append(f"block {name!r} differs from what bench/tables.py prints from bench/results/")
    return out


def rewrite(text: str) -> str:
    return "\n".join(content if name is None else TABLES[name]() for name, content in _segments(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", metavar="MD", help="compare the blocks of this Markdown file with the result files")
    ap.add_argument("--write", metavar="MD", help="rewrite the blocks of this Markdown file from the result files")
    args = ap.parse_args()
    if args.write:
        path = Path(args.write)
        path.write_text(rewrite(path.read_text(encoding="utf-8")), encoding="utf-8")
    elif args.check:
        text = Path(args.check).read_text(encoding="utf-8")
        found = problems(text)
        if found:
            new = rewrite(text)
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), args.check, "bench/results"))
            raise SystemExit("\n".join(found))
    else:
        for name, make in TABLES.items():
            print(f"{BEGIN.format(name)}\n{make()}\n{END}\n")


if __name__ == "__main__":
    main()
