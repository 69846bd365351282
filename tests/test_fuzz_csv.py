"""Property-based: malformed CSVs either validate or fail with DataValidationError naming file, line, column.

Never a pandas/csv/codec traceback, and never a partial dataset on disk. The case count is printed
(`pytest -s`) and asserted.
"""
from __future__ import annotations

import csv
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personatune.data import COLUMNS, DataValidationError, build_dataset

CASES = {"valid": 0, "rejected": 0}
CELL = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
GOOD_CELL = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="#=+-@"),
                    min_size=1, max_size=40).filter(lambda s: s.strip())


def render(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue().encode("utf-8")


def mutate(data: bytes, how: str, position: int, blob: bytes) -> bytes:
    pos = position % (len(data) + 1)
    return {
        "none": data,
        "insert": data[:pos] + blob + data[pos:],
        "truncate": data[:pos],
        "bom8": b"\xef\xbb\xbf" + data,
        "bom16": "instruction,user,response\n".encode("utf-16") + data,
        "latin1": data.decode("utf-8").encode("latin-1", errors="replace"),
        "nul": data[:pos] + b"\x00" + data[pos:],
        "quote": data[:pos] + b'"' + data[pos:],
        "huge": data + b"a,b," + b"x" * 5000 + b"\n",
        "crlf": data.replace(b"\n", b"\r\n"),
        "dup": data + data.split(b"\n", 1)[-1],
        "marker": data + b"i,u,### Response: hi\n",
        "formula": data + b'=cmd(),"u","r"\n',
        "empty": b"",
        "header_only": data.split(b"\n", 1)[0] + b"\n",
    }[how]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.one_of(st.just(list(COLUMNS)), st.just(list(COLUMNS)), st.permutations(list(COLUMNS)),
                     st.lists(st.sampled_from([*COLUMNS, "prompt", "", "Response", "extra"]), max_size=5)),
    rows=st.one_of(
        st.lists(st.lists(GOOD_CELL, min_size=3, max_size=3), min_size=4, max_size=12,
                 unique_by=lambda r: (r[0].strip(), r[1].strip())),
        st.lists(st.lists(st.one_of(GOOD_CELL, CELL), min_size=2, max_size=4), max_size=12),
    ),
    how=st.sampled_from(["none", "insert", "truncate", "bom8", "bom16", "latin1", "nul", "quote", "huge", "crlf",
                         "dup", "marker", "formula", "empty", "header_only"]),
    position=st.integers(min_value=0, max_value=10_000),
    blob=st.binary(max_size=12),
)
def test_malformed_csvs_fail_cleanly(tmp_path_factory, header, rows, how, position, blob):
    work = tmp_path_factory.mktemp("fuzz")
    path = work / "q.csv"
    path.write_bytes(mutate(render(header, rows), how, position, blob))
    out = work / "dataset"
    try:
        build_dataset(path, 0.5, out)
    except DataValidationError as err:
        CASES["rejected"] += 1
        assert err.problems and all(p.file == str(path) for p in err.problems)
        assert str(path) in str(err)
        located = [p for p in err.problems if p.line is not None or p.column is not None]
        whole_file = ("empty", "no data rows", "too few", "UTF-16")
        assert located or any(w in str(err) for w in whole_file), str(err)
        assert not out.exists() and not list(work.glob(".tmp-*"))  # nothing half-written
    else:
        CASES["valid"] += 1
        assert (out / ".complete").is_file()


def test_fuzz_ran_enough_cases():
    total = CASES["valid"] + CASES["rejected"]
    print(f"\nCSV fuzz: {total} cases, {CASES['rejected']} rejected with located errors, {CASES['valid']} valid")
    assert total >= 400 and CASES["rejected"] > CASES["valid"] > 0
