"""Per-stage times of `python -m flows.finetune` runs, read from their logs (bench/results/flow_h200/).

Each stage's time runs from the end of the previous one to its own `stage <name>: ran|cached` line; start-up is
the process start (its end minus the measured process time) to the flow run's first line, which covers imports
and the temporary Prefect API server; `finish` is the last stage to the process end (judge, bundle, release,
server stop). Usage: python bench/flow_stages.py [bench/results/flow_h200/runs.json]
"""
from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from pathlib import Path

LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+\s+\| (.*)$")
STAGE = re.compile(r"stage (\w+): (ran|cached)")


def _t(stamp: str) -> float:
    return (datetime.strptime(stamp, "%H:%M:%S.%f") - datetime(1900, 1, 1)).total_seconds()


def stage_times(log: str, process_s: float) -> dict[str, float]:
    """{stage: seconds} in run order; repeated stages (score: base, then challenger) are numbered."""
    stamps = [(_t(m[1]), m[2]) for m in map(LINE.match, log.splitlines()) if m]
    begin = next(t for t, text in stamps if "Beginning flow run" in text)
    end = stamps[-1][0]
    out = {"start-up": round(begin - (end - process_s), 1)}
    last = begin
    for t, text in stamps:
        m = STAGE.search(text)
        if m:
            name, n = m[1], 2
            while name in out:
                name, n = f"{m[1]} {n}", n + 1
            out[name] = round(t - last, 1)
            last = t
    out["finish"] = round(end - last, 1)
    out["process"] = round(process_s, 1)
    return out


def main(runs_json: str = "bench/results/flow_h200/runs.json") -> None:
    meta = json.loads(Path(runs_json).read_text())
    rows = [(r["log"], stage_times((Path(runs_json).parent / r["log"]).read_text(), r["process_s"])) for r in meta["runs"]]
    cols = list(dict.fromkeys(k for _, times in rows for k in times))
    print(f"{meta['machine']}\n{meta['model']}; {meta['data']}\n")
    print("| run | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, times in rows:
        print(f"| {name.removesuffix('.log')} | " + " | ".join(f"{times[c]:.1f}" if c in times else "-" for c in cols) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
