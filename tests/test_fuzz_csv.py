"""Property-based: malformed CSVs either validate or fail with DataValidationError naming file, line, column.

Never a pandas/csv/codec traceback, and never a partial dataset on disk. Mutations that always make a file
invalid (a NUL byte, a huge cell, a scaffold marker, a formula, a duplicated body, UTF-16, empty, header only)
must be rejected; on a file that is valid before the mutation, the appended bad row is named by its line and
column, and a UTF-8 BOM changes nothing. The case counts are printed (`pytest -s`) and asserted.
"""
from __future__ import annotations

import csv
import io

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from personatune.data import COLUMNS, DataValidationError, build_dataset, load_quotes

CASES = {"valid": 0, "rejected": 0, "must_reject": 0, "located": 0}
# Mutations after which no file can be valid, whatever it held before.
MUST_REJECT = {"nul", "huge", "marker", "formula", "dup", "bom16", "empty", "header_only"}
# Mutations that append one bad row: on an otherwise valid file, (header index of the bad cell, what is said).
APPENDED_ROW = {"huge": (2, "longer than 2000 characters"), "marker": (2, "scaffold marker '###'"),
                "formula": (0, "spreadsheet formula")}
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


# Always run, whatever hypothesis draws: each appended bad row on a valid file, and the valid file itself.
VALID_ROWS = [["Respond as Wednesday.", f"Question {i}?", f"Answer {i}, bleakly."] for i in range(8)]


@example(header=["user", "response", "instruction"], rows=VALID_ROWS, how="huge", position=0, blob=b"")
@example(header=list(COLUMNS), rows=VALID_ROWS, how="marker", position=0, blob=b"")
@example(header=list(COLUMNS), rows=VALID_ROWS, how="formula", position=0, blob=b"")
@example(header=list(COLUMNS), rows=VALID_ROWS, how="bom8", position=0, blob=b"")
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
    original = render(header, rows)
    (work / "original.csv").write_bytes(original)
    try:
        load_quotes(work / "original.csv")
        was_valid = True
    except DataValidationError:
        was_valid = False
    path = work / "q.csv"
    path.write_bytes(mutate(original, how, position, blob))
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
        if was_valid and how in ("none", "bom8"):  # a valid file (with or without a BOM) can only be too small
            assert [p.message for p in err.problems] == [f"{len(rows)} rows are too few to hold out 50% for evaluation"]
        if was_valid and how in APPENDED_ROW:  # exactly the appended row is named, at its line and column
            index, said = APPENDED_ROW[how]
            line = original.count(b"\n") + 1
            assert [(p.line, p.column) for p in err.problems] == [(line, header[index])], str(err)
            assert said in err.problems[0].message, str(err)
            CASES["located"] += 1
    else:
        CASES["valid"] += 1
        assert how not in MUST_REJECT, f"a {how!r} mutation was accepted:\n{path.read_bytes()[:500]!r}"
        assert was_valid or how not in ("none", "bom8")  # nothing invalid turns valid without a change
        assert (out / ".complete").is_file()
    CASES["must_reject"] += how in MUST_REJECT


def test_fuzz_ran_enough_cases(tmp_path_factory):
    if not CASES["valid"] + CASES["rejected"]:  # run alone (or first): run the fuzz here, so the count is its own
        test_malformed_csvs_fail_cleanly(tmp_path_factory=tmp_path_factory)
    total = CASES["valid"] + CASES["rejected"]
    print(f"\nCSV fuzz: {total} cases, {CASES['rejected']} rejected with located errors, {CASES['valid']} valid; "
          f"{CASES['must_reject']} of the rejected were mutations that must be, {CASES['located']} appended bad rows "
          "on valid files named by line and column")
    assert total >= 400 and CASES["rejected"] > CASES["valid"] > 0
    assert CASES["must_reject"] >= 100 and CASES["located"] >= 3  # the checks above ran (the @examples at least)
