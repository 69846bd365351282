"""The adapter bundle: everything a user or the Hub needs, in `outputs/<run>/`, written all at once.

`outputs/latest` is a symlink swapped atomically (rename over it), so it only ever names a complete bundle.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from personatune.config import FinetuneConfig
from personatune.files import COMPLETE_MARKER, atomic_dir, is_complete

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "history.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "added_tokens.json")


def default_run_name(data_hash: str) -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + f"-{data_hash[:8]}"


def write_bundle(cfg: FinetuneConfig, run_name: str, adapter_dir: str | Path, eval_dir: str | Path,
                 provenance: dict, release: dict | None = None, rows: list[dict] | None = None) -> Path:
    """Copy adapter, tokenizer, eval, decoding and the resolved config into outputs/<run_name>/.

    `release` (the verdict and the data diff against the champion) goes into release.json and the report; `rows`
    (what the run trained on) into data_rows.json, so a later run can say what changed. Whether `latest` moves
    to this bundle is the release step's decision (personatune.release), not this function's."""
    outputs = Path(cfg.output_dir)
    run_dir = outputs / run_name
    if is_complete(run_dir):
        raise FileExistsError(f"{run_dir} already holds a bundle; choose another run_name")
    with atomic_dir(run_dir) as tmp:
        for name in (*ADAPTER_FILES, *TOKENIZER_FILES):
            if (Path(adapter_dir) / name).is_file():
                shutil.copy2(Path(adapter_dir) / name, tmp / name)
        shutil.copy2(Path(eval_dir) / "eval.json", tmp / "eval.json")
        if (Path(eval_dir) / "generation_config.json").is_file():  # written by every evaluation since it exists
            shutil.copy2(Path(eval_dir) / "generation_config.json", tmp / "generation_config.json")
        report = (Path(eval_dir) / "report.md").read_text()
        if release is not None:
            (tmp / "release.json").write_text(json.dumps(release, indent=2) + "\n")
            report += "\n" + render_release(release)
        (tmp / "report.md").write_text(report)
        if rows is not None:
            (tmp / "data_rows.json").write_text(json.dumps(rows, indent=1) + "\n")
        for extra in Path(eval_dir).glob("*.png"):
            shutil.copy2(extra, tmp / extra.name)
        (tmp / "training_config.json").write_text(
            json.dumps({"config": cfg.to_dict(), **provenance}, indent=2, sort_keys=True) + "\n")
    return run_dir


IMAGE_LINK = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<name>[A-Za-z0-9_.-]+\.png)\)")


def inline_images(markdown: str, folder: str | Path) -> str:
    """The report for a viewer that cannot open the files next to it (the Prefect UI's artifact page): each
    `![alt](name.png)` of a PNG in `folder` becomes a `data:image/png;base64,...` URI. report.md in the bundle
    keeps the relative link."""
    def embed(link: re.Match) -> str:
        png = Path(folder) / link["name"]
        if not png.is_file():
            return link[0]
        return f"![{link['alt']}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode('ascii')})"

    return IMAGE_LINK.sub(embed, markdown)


def render_release(release: dict) -> str:
    """The report's release section: the verdict with its checks, and what changed in the data."""
    v = release["verdict"]
    lines = ["## Release verdict", "", f"**{'Promoted' if v['promoted'] else 'Rejected'}**: {v['reason']}", "",
             "| check | challenger | " + v["against"] + " | limit | passed |", "|---|---|---|---|---|"]
    for c in v["checks"]:
        fmt = "{:.1%}" if c["metric"] == "run_on_rate" else "{:.4f}"
        cell = lambda x: "n/a" if x is None else fmt.format(x)  # noqa: E731 - a skipped check has no numbers
        lines.append(f"| {c['metric']} | {cell(c['challenger'])} | {cell(c['reference'])} | {cell(c['limit'])} | "
                     f"{'yes' if c['passed'] else 'no'} |")
    diff = release.get("diff")
    lines += ["", "## Data changes since the champion", ""]
    if not diff:
        lines.append("No champion yet: nothing to compare with." if not release.get("champion") else
                     f"The champion {release['champion']} has no record of its rows (data_rows.json): no diff.")
        return "\n".join(lines) + "\n"
    lines.append(f"{diff['added']} rows added, {diff['removed']} removed, {diff['edited']} edited, "
                 f"{diff['unchanged']} unchanged (rows matched by instruction + user).")
    for kind in ("added", "removed", "edited"):
        for row in diff["samples"][kind]:
            text = (f"{row['before']!r} -> {row['after']!r}" if kind == "edited" else repr(row["response"]))
            lines.append(f"- {kind}: *{row['user']}*: {text}")
    return "\n".join(lines) + "\n"


def point_latest(outputs: Path, run_name: str) -> None:
    link = outputs / "latest"
    tmp = outputs / f".latest-{uuid.uuid4().hex[:8]}"
    os.symlink(run_name, tmp)
    os.replace(tmp, link)


def latest_bundle(outputs: str | Path = "outputs") -> Path:
    link = Path(outputs) / "latest"
    if not link.exists() or not (link / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"no complete bundle at {link}; run `python -m flows.finetune` first")
    return link.resolve()
