"""Validate the curated quotes CSV and turn it into an Arrow dataset with a stable train/eval split.

Every problem is reported as `file:line: column 'x': what is wrong`, where `line` is the physical line of
the CSV (the header is line 1), so a curator can jump straight to it. All problems are collected before
failing; nothing is written unless the whole file is valid.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pandera.pandas as pa

from personatune.files import atomic_dir, is_complete, stable_hash

COLUMNS = ("instruction", "user", "response")
MAX_CELL_CHARS = 2000
MAX_PROBLEMS_SHOWN = 25
FORMULA_PREFIXES = ("=", "+", "-", "@")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        col = f" column '{self.column}':" if self.column else ""
        return f"{where}:{col} {self.message}"


class DataValidationError(ValueError):
    """The CSV is not fit to train on. `problems` lists each one with file, line and column."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(problems)} problem(s) in the quotes CSV:\n{shown}{tail}")


def _decode(raw: bytes, file: str) -> str:
    for bom, name in ((b"\xff\xfe", "UTF-16 LE"), (b"\xfe\xff", "UTF-16 BE")):
        if raw.startswith(bom):
            raise DataValidationError([Problem(file, 1, None, f"file is {name} encoded; save it as UTF-8")])
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM (Excel adds one) is harmless: drop it
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        start = raw.rfind(b"\n", 0, e.start) + 1
        column = _column_at(raw[start:e.start].decode("utf-8", "replace"))
        raise DataValidationError(
            [Problem(file, line, column, f"bytes {raw[e.start:e.start + 4]!r} are not valid UTF-8; save the file as UTF-8")]
        ) from None


def _column_at(line_prefix: str) -> str | None:
    """Which column a position on a line falls in, from the text of the line before it."""
    try:
        fields = next(csv.reader([line_prefix]), [""])
    except csv.Error:
        return None
    index = max(len(fields) - 1, 0)
    return COLUMNS[index] if index < len(COLUMNS) else None


OTHER_DELIMITERS = {";": "';'", "\t": "tab", "|": "'|'"}


def _other_delimiter(header_line: str) -> str | None:
    """The name of the delimiter a header line was written with, when that is not a comma: it splits there into
    required column names (any case), or into several fields while holding no comma at all."""
    def names(delimiter: str) -> list[str]:
        try:
            return [h.strip().lower() for h in next(csv.reader([header_line], delimiter=delimiter), [])]
        except csv.Error:
            return []

    if set(COLUMNS) <= set(names(",")):
        return None
    for delimiter, name in OTHER_DELIMITERS.items():
        fields = names(delimiter)
        if len(fields) > 1 and (set(COLUMNS) & set(fields) or "," not in header_line):
            return name
    return None


def read_rows(text: str, file: str) -> pd.DataFrame:
    """Parse CSV text strictly. Returns a frame with the three columns plus `line` (physical line)."""
    problems: list[Problem] = []
    if "\x00" in text:
        for n, line_text in enumerate(text.split("\n"), start=1):
            if "\x00" in line_text:
                problems.append(Problem(file, n, _column_at(line_text[: line_text.index("\x00")]), "contains a NUL byte"))
        raise DataValidationError(problems)
    if not text.strip():
        raise DataValidationError([Problem(file, None, None, "file is empty; expected a header instruction,user,response and data rows")])

    delimiter = _other_delimiter(text.split("\n", 1)[0].rstrip("\r"))
    if delimiter:
        raise DataValidationError([Problem(
            file, 1, None, f"looks like {delimiter}-separated; personatune reads comma-separated CSV: save or export "
                           "the file with ',' as the delimiter")])

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    # csv stops at 128 KiB per field with "field larger than field limit", a message that names no column;
    # parse any size and let the cell-length check say which line and column are too long
    limit = csv.field_size_limit(max(len(text) + 1, csv.field_size_limit()))
    try:
        header = next(reader)
        start = 2
        for row in reader:
            if row:  # a blank line carries no data
                records.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataValidationError(
            [Problem(file, reader.line_num, None, f"malformed CSV ({e}); check for an unbalanced double quote")]
        ) from None
    finally:
        csv.field_size_limit(limit)

    header = [h.strip() for h in header]  # spaces around a name are ignored; the names themselves are exact
    missing = [c for c in COLUMNS if c not in header]
    extra = [h for h in header if h not in COLUMNS]
    if missing or extra or len(header) != len(set(header)):
        for c in missing:  # each missing column is named, with the header cell that differs from it only by case
            variant = next((h for h in extra if h.lower() == c), None)
            problems.append(Problem(file, 1, variant, f"looks like '{c}': header names are lower case (required column "
                                                      f"'{c}' is missing)") if variant else
                            Problem(file, 1, c, "required column is missing from the header"))
        problems += [Problem(file, 1, c or "(blank)", "unexpected column in the header")
                     for c in extra if c.lower() not in missing]
        if len(header) != len(set(header)):
            problems.append(Problem(file, 1, None, f"header repeats a column name: {header}"))
        raise DataValidationError(problems)
    if not records:
        raise DataValidationError([Problem(file, None, None, "no data rows after the header")])

    rows = []
    for line, row in records:
        if len(row) != len(header):
            problems.append(
                Problem(file, line, None, f"expected {len(header)} fields, found {len(row)} (stray comma or unbalanced quote?)")
            )
            continue
        rows.append({**dict(zip(header, row)), "line": line})
    if problems:
        raise DataValidationError(problems)
    return pd.DataFrame(rows, columns=[*COLUMNS, "line"])


def _cell_checks() -> list[pa.Check]:
    return [
        pa.Check(lambda s: s.str.strip().str.len() > 0, element_wise=False, error="cell is empty"),
        pa.Check(lambda s: s.str.len() <= MAX_CELL_CHARS, error=f"cell is longer than {MAX_CELL_CHARS} characters"),
        pa.Check(lambda s: ~s.str.contains("###", regex=False), error="contains the scaffold marker '###', which would break the prompt format"),
        pa.Check(lambda s: ~s.str.lstrip().str.startswith(FORMULA_PREFIXES), error="starts with = + - or @ (a spreadsheet formula); rephrase it"),
        pa.Check(lambda s: ~s.str.contains(r"[\x00-\x08\x0b-\x1f\x7f]", regex=True), error="contains a control character"),
    ]


SCHEMA = pa.DataFrameSchema(
    {c: pa.Column(str, checks=_cell_checks(), nullable=False) for c in COLUMNS},
    strict=False,
)


def validate_frame(df: pd.DataFrame, file: str) -> pd.DataFrame:
    problems: list[Problem] = []
    try:
        SCHEMA.validate(df, lazy=True)
    except pa.errors.SchemaErrors as e:
        fc = e.failure_cases
        for _, case in fc.iterrows():
            idx = case["index"]
            line = int(df.loc[idx, "line"]) if idx is not None and idx in df.index else None
            problems.append(Problem(file, line, case["column"], str(case["check"])))
    stripped = df[list(COLUMNS)].apply(lambda col: col.str.strip())
    for subset, what in ((list(COLUMNS), "duplicate of the row on line {}"),
                         (["instruction", "user"], "same instruction and user as line {} with another response")):
        first_line = df.groupby([stripped[c] for c in subset], sort=False)["line"].transform("first")
        for idx in df.index[stripped.duplicated(subset=subset, keep="first")]:
            if subset != list(COLUMNS) and stripped.duplicated(keep="first")[idx]:
                continue  # already reported as a full duplicate
            problems.append(Problem(file, int(df.loc[idx, "line"]), None, what.format(int(first_line[idx]))))
    if problems:
        problems.sort(key=lambda p: (p.line or 0, COLUMNS.index(p.column) if p.column in COLUMNS else -1))
        raise DataValidationError(problems)
    return df.assign(**{c: df[c].str.strip() for c in COLUMNS})


def load_quotes(path: str | Path, name: str | None = None) -> pd.DataFrame:
    """Read and validate the CSV; raise DataValidationError naming file (`name`: what the user gave, e.g. the
    URL of a downloaded copy), line and column."""
    path = Path(path)
    file = name or str(path)
    if not path.is_file():
        raise DataValidationError([Problem(file, None, None, "file does not exist")])
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataValidationError([Problem(file, None, None, f"cannot be read: {e.strerror}")]) from None
    return validate_frame(read_rows(_decode(raw, file), file), file)


def split_of(instruction: str, user: str, eval_fraction: float) -> str:
    """'eval' or 'train' from a hash of the prompt: adding or editing other rows never moves this one."""
    digest = hashlib.sha256(f"{instruction}\x1f{user}".encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def build_dataset(quotes_csv: str | Path, eval_fraction: float, dataset_dir: str | Path, name: str | None = None) -> Path:
    """Validate `quotes_csv` and save a DatasetDict(train, eval) to `dataset_dir` (Arrow, memory-mapped).
    Problems name the file as `name` (default: the path)."""
    from datasets import Dataset, DatasetDict
    from datasets.table import InMemoryTable

    dataset_dir = Path(dataset_dir)
    df = load_quotes(quotes_csv, name)
    split = [split_of(i, u, eval_fraction) for i, u in zip(df["instruction"], df["user"])]
    df = df.assign(split=split)
    if (df["split"] == "eval").sum() == 0 or (df["split"] == "train").sum() == 0:
        raise DataValidationError(
            [Problem(name or str(quotes_csv), None, None, f"{len(df)} rows are too few to hold out {eval_fraction:.0%} for evaluation")]
        )
    if is_complete(dataset_dir):
        return dataset_dir
    parts = {}
    for name in ("train", "eval"):
        rows = df[df["split"] == name][[*COLUMNS, "line"]]
        # the split's `datasets` fingerprint is its content, given here: left to `datasets`, it pickles the table
        # with dill, which prints disassembled bytecode (into the task log under Prefect's log_prints)
        fingerprint = stable_hash("personatune.data", name, rows.to_dict("list"))
        parts[name] = Dataset(InMemoryTable.from_pandas(rows, preserve_index=False), split=name, fingerprint=fingerprint)
    with atomic_dir(dataset_dir) as tmp:
        DatasetDict(parts).save_to_disk(str(tmp))
    return dataset_dir


if __name__ == "__main__":  # python -m personatune.data data/quotes.csv: validate without training
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "data/quotes.csv"
    try:
        frame = load_quotes(target)
    except DataValidationError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
    print(f"{target}: {len(frame)} valid rows")
