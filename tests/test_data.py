"""Benchmark loaders: formats, per-benchmark field defaults, GPQA choices, and one-line errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vopd.data import GPQA_COLUMNS, load_problems, read_rows
from vopd.errors import UserError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_math500_fields_prefer_answer_over_solution(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "What is 1/2 + 0?", "solution": r"It is \boxed{\frac12}.", "answer": r"\frac{1}{2}"},
        {"problem": "2+2?", "solution": r"\boxed{4}", "answer": "4"},
    ])
    problems = load_problems(f)
    assert [(p.problem, p.answer, p.kind) for p in problems] == [
        ("What is 1/2 + 0?", r"\frac{1}{2}", "math"), ("2+2?", "4", "math")]
    assert problems[1].source == "math500.jsonl:line 2"


def test_answer_derived_from_solution_when_no_answer_field(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "minerva.jsonl", [{"problem": "p", "solution": r"so $\boxed{\frac{1}{\sqrt{2}}}$."}])
    assert load_problems(f)[0].answer == r"\frac{1}{\sqrt{2}}"


def test_aime_amc_and_tiny_task_layouts(tmp_path: Path) -> None:
    aime = write_jsonl(tmp_path / "aime24.jsonl", [{"ID": "2024-I-1", "Problem": "x?", "Answer": 204}])
    amc = write_jsonl(tmp_path / "amc23.jsonl", [{"question": "y?", "answer": 27.0}, {"question": "z?", "answer": 2.5}])
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"problem": "Start at 3. add 4.", "solution": r"\boxed{7}",
                                                  "answer": "-7"}])
    assert [(p.problem, p.answer) for p in load_problems(aime)] == [("x?", "204")]
    assert [p.answer for p in load_problems(amc)] == ["27", "2.5"]  # 27.0 is the integer answer 27
    assert load_problems(tiny)[0].answer == "-7"


def test_explicit_field_names_and_limit(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "custom.jsonl", [{"q": f"q{i}", "gold": i, "answer": "ignored"} for i in range(5)])
    problems = load_problems(f, problem_field="q", answer_field="gold", limit=2)
    assert [(p.problem, p.answer) for p in problems] == [("q0", "0"), ("q1", "1")]


def test_json_list_and_data_object(tmp_path: Path) -> None:
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "obj.json").write_text(json.dumps({"data": rows, "version": "1.0"}))
    for name in ("list.json", "obj.json"):
        problems = load_problems(tmp_path / name)
        assert [p.answer for p in problems] == ["1", "2"] and problems[0].source == f"{name}:row 1"


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow comes with datasets, a dependency")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["a", "b"], "answer": ["1", "2"]}), tmp_path / "t.parquet")
    assert [(p.problem, p.answer) for p in load_problems(tmp_path / "t.parquet")] == [("a", "1"), ("b", "2")]


def test_mcq_choices_with_letter_index_or_text_answers(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "mcq.jsonl", [
        {"question": "Q1", "choices": ["red", "green", "blue"], "answer": "C"},
        {"question": "Q2", "choices": ["red", "green", "blue"], "answer": 1},  # 0-based index
        {"question": "Q3", "choices": ["red", "green", "blue"], "answer": "red"},
        {"question": "Q4", "options": {"A": "x", "B": "y"}, "answer": "(b)"},
    ])
    problems = load_problems(f)  # kind auto-detected from the choices field
    assert [p.kind for p in problems] == ["mcq"] * 4
    assert [p.answer for p in problems] == ["C", "B", "A", "B"]
    assert problems[0].problem == "Q1\n\nA) red\nB) green\nC) blue"


def test_gpqa_original_columns_are_shuffled_deterministically(tmp_path: Path) -> None:
    rows = [{"Question": f"Q{i}", GPQA_COLUMNS[0]: f"right{i}", **{c: f"wrong{i}{k}" for k, c in
                                                                   enumerate(GPQA_COLUMNS[1:])}} for i in range(6)]
    f = write_jsonl(tmp_path / "gpqa.jsonl", rows)
    g = write_jsonl(tmp_path / "gpqa_reversed.jsonl", rows[::-1])
    problems = load_problems(f)
    for i, p in enumerate(problems):
        assert p.kind == "mcq" and sorted(p.choices) == sorted([f"right{i}"] + [f"wrong{i}{k}" for k in range(3)])
        assert p.choices["ABCD".index(p.answer)] == f"right{i}"  # the gold letter points at the right answer
    assert {p.answer for p in problems} != {"A"}  # shuffled, not always first
    assert [(p.problem, p.answer) for p in load_problems(g)] == [(p.problem, p.answer) for p in problems[::-1]]
    csv_path = tmp_path / "gpqa.csv"
    import csv

    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert [p.answer for p in load_problems(csv_path)] == [p.answer for p in problems]


def expect_one_line_error(match: str, *args: object, **kwargs: object) -> str:
    with pytest.raises(UserError, match=match) as info:
        load_problems(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_field_names_file_line_field_and_present_fields(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "text": "2", "id": 7}])
    message = expect_one_line_error("line 2", f)
    assert str(f) in message and "'answer'" in message and "'text'" in message and "'id'" in message
    assert "--field-answer" in message
    message = expect_one_line_error("line 1", f, problem_field="question")
    assert "'question'" in message and "'problem'" in message


def test_file_errors(tmp_path: Path) -> None:
    expect_one_line_error("no such file", tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    expect_one_line_error("no rows", tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    expect_one_line_error("no rows", tmp_path / "empty.json")
    (tmp_path / "broken.jsonl").write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", answer: 2}\n')
    expect_one_line_error(r"broken\.jsonl: line 2: not valid JSON", tmp_path / "broken.jsonl")
    (tmp_path / "array.jsonl").write_text('[1, 2]\n')
    expect_one_line_error("line 1: expected a JSON object", tmp_path / "array.jsonl")
    (tmp_path / "lines.json").write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"}\n')
    expect_one_line_error(r"not valid JSON .*\.jsonl", tmp_path / "lines.json")
    (tmp_path / "two.json").write_text(json.dumps({"train": [], "test": []}))
    expect_one_line_error("found keys train, test", tmp_path / "two.json")
    (tmp_path / "data.txt").write_text("x")
    expect_one_line_error("unsupported file type", tmp_path / "data.txt")
    write_jsonl(tmp_path / "nobox.jsonl", [{"problem": "p", "solution": "no box here"}])
    expect_one_line_error(r"line 1: field 'solution' has no \\boxed", tmp_path / "nobox.jsonl")
    write_jsonl(tmp_path / "badmcq.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "E"}])
    expect_one_line_error("neither a letter A-B", tmp_path / "badmcq.jsonl")
    write_jsonl(tmp_path / "nochoices.jsonl", [{"question": "q", "answer": "A"}])
    expect_one_line_error("missing field for the choices", tmp_path / "nochoices.jsonl", kind="mcq")


def test_corrupt_parquet_is_a_user_error(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="pyarrow comes with datasets, a dependency")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    expect_one_line_error(r"bad\.parquet: not a readable parquet file", tmp_path / "bad.parquet")


def test_read_rows_locations(tmp_path: Path) -> None:
    (tmp_path / "gaps.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_rows(tmp_path / "gaps.jsonl") == [("line 1", {"a": 1}), ("line 3", {"a": 2})]


def test_datasets_save_to_disk_directories(tmp_path: Path) -> None:
    """A ``datasets`` ``save_to_disk`` directory (or a one-split DatasetDict) reads like a file: benchmark problems,
    training prompts (texts and conversations), the same one-line errors."""
    datasets = pytest.importorskip("datasets", reason="datasets is a dependency")
    from vopd.data import load_prompts

    rows = [{"problem": "2+2?", "answer": "4", "messages": None},
            {"problem": None, "answer": "1/2", "messages": [{"role": "user", "content": "half?"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "one")
    assert read_rows(tmp_path / "one") == [("row 1", rows[0]), ("row 2", rows[1])]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(tmp_path / "split")
    assert [(p.problem, p.answer, p.source) for p in load_problems(tmp_path / "split")] == [("2+2?", "4", "split:row 1")]

    class Tok:  # the text row needs only a tokenizer call; the conversation row its chat template
        chat_template = None

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            return {"input_ids": [1] + [ord(c) for c in text]}

    text_only = tmp_path / "text"
    datasets.Dataset.from_list([{"problem": "2+2?"}]).save_to_disk(text_only)
    assert load_prompts(text_only, Tok(), field="problem", template="{problem}", max_tokens=50, long_prompts="error",
                        log=print) == [[1, 50, 43, 50, 63]]
    with pytest.raises(UserError, match="row 2: the row holds a conversation .* but the tokenizer of .* has none"):
        load_prompts(tmp_path / "one", Tok(), field="problem", template="{problem}", max_tokens=50,
                     long_prompts="error", log=print)

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
                         ).save_to_disk(tmp_path / "two")
    expect_one_line_error(r"holds the splits train, test; pass one split's directory, e\.g\. .*two/train",
                          tmp_path / "two")
    datasets.Dataset.from_list(rows).select([]).save_to_disk(tmp_path / "empty")
    expect_one_line_error("the dataset has no rows", tmp_path / "empty")
    (tmp_path / "plain").mkdir()
    expect_one_line_error("is a directory but not a datasets save_to_disk directory", tmp_path / "plain")
    datasets.Dataset.from_list([{"question": "q"}]).save_to_disk(tmp_path / "nofield")
    expect_one_line_error(r"nofield: row 1: missing field for the answer .*this row has .question.", tmp_path / "nofield")


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_csv_cells_stay_text_as_written(tmp_path: Path) -> None:
    """csv goes through ``datasets`` with every column as a string: no number inference ("007" is not 7, "1.0" is
    not 1), no missing-value guessing ("NA", "None", "nan" and "" stay text), quoted newlines kept, a byte-order
    mark is not part of the first column's name, blank lines are not rows."""
    f = write_csv(tmp_path / "t.csv", '\ufeffproblem,answer,note\n"two\nlines",007,NA\n\nb,,None\nc,1.0,nan\n')
    assert read_rows(f) == [("row 1", {"problem": "two\nlines", "answer": "007", "note": "NA"}),
                            ("row 2", {"problem": "b", "answer": "", "note": "None"}),
                            ("row 3", {"problem": "c", "answer": "1.0", "note": "nan"})]
    assert [p.answer for p in load_problems(f, limit=1)] == ["007"]


def test_csv_errors_are_one_line(tmp_path: Path) -> None:
    for name, text in (("zero.csv", ""), ("blank.csv", "\n\n"), ("header.csv", "problem,answer\n")):
        expect_one_line_error("the file has no rows", write_csv(tmp_path / name, text))
    message = expect_one_line_error(r"long\.csv: not a readable csv file \(.*", write_csv(
        tmp_path / "long.csv", "problem,answer\na,1\nb,2,3\n"))
    assert "line 3" in message  # pandas names the file line
    # A first row longer than the header would otherwise shift into an index column or lose its extra cell.
    expect_one_line_error(r"first\.csv: not a readable csv file", write_csv(tmp_path / "first.csv", "a,b\n1,2,3\n"))
    expect_one_line_error(r"dup\.csv: the header names the column 'a' more than once",
                          write_csv(tmp_path / "dup.csv", "a,b,a\n1,2,3\n"))
    (tmp_path / "latin.csv").write_bytes("problem,answer\nd\xe9j\xe0,1\n".encode("latin-1"))
    expect_one_line_error(r"latin\.csv: not UTF-8 text", tmp_path / "latin.csv")
    (tmp_path / "latin_header.csv").write_bytes("probl\xe8me,answer\na,1\n".encode("latin-1"))
    expect_one_line_error(r"latin_header\.csv: not UTF-8 text", tmp_path / "latin_header.csv")


def test_parquet_through_datasets(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["a", None], "answer": [7, 8], "choices": [["x", "y"], None]}),
                   tmp_path / "t.parquet")
    assert read_rows(tmp_path / "t.parquet") == [("row 1", {"problem": "a", "answer": 7, "choices": ["x", "y"]}),
                                                 ("row 2", {"problem": None, "answer": 8, "choices": None})]
    pq.write_table(pa.table({"problem": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    expect_one_line_error(r"empty\.parquet: the file has no rows", tmp_path / "empty.parquet")


def test_edited_file_is_read_afresh(tmp_path: Path) -> None:
    """No cache between reads: rewriting a file (same name, same size, at once) changes what is read."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = write_csv(tmp_path / "t.csv", "problem,answer\na,1\n")
    assert read_rows(f) == [("row 1", {"problem": "a", "answer": "1"})]
    write_csv(f, "problem,answer\nb,2\n")
    assert read_rows(f) == [("row 1", {"problem": "b", "answer": "2"})]
    write_csv(f, "problem,answer,solution\nb,2,s\nc,3,t\n")
    assert [row for _, row in read_rows(f)] == [{"problem": "b", "answer": "2", "solution": "s"},
                                                {"problem": "c", "answer": "3", "solution": "t"}]
    g = tmp_path / "t.parquet"
    pq.write_table(pa.table({"answer": ["1"]}), g)
    assert read_rows(g) == [("row 1", {"answer": "1"})]
    pq.write_table(pa.table({"answer": ["2"]}), g)
    assert read_rows(g) == [("row 1", {"answer": "2"})]


def test_datasets_reads_offline_quietly_and_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    """csv/parquet reads make no network connection, print no progress bar or log line (a failure is the one-line
    UserError only), leave nothing in the temporary directory or in ``datasets``' own cache, and restore
    ``datasets``' progress-bar setting."""
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import socket

    import pyarrow.parquet as pq

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    hf_cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(hf_cache.glob("*/*")) if hf_cache.exists() else None
    bars_off = datasets.utils.are_progress_bars_disabled()
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"problem": ["a"], "answer": ["1"]}), data / "t.parquet")
    write_csv(data / "t.csv", "problem,answer\na,1\n")
    capfd.readouterr()
    assert read_rows(data / "t.parquet") == read_rows(data / "t.csv") == [("row 1", {"problem": "a", "answer": "1"})]
    expect_one_line_error("not a readable csv file", write_csv(data / "bad.csv", "a\n1\n2,3\n"))
    out, err = capfd.readouterr()
    assert out == err == ""
    assert list(scratch.iterdir()) == []
    assert (sorted(hf_cache.glob("*/*")) if hf_cache.exists() else None) == before
    assert datasets.utils.are_progress_bars_disabled() == bars_off


def test_jsonl_and_json_values_stay_as_written(tmp_path: Path) -> None:
    """json files are read with the json module, not ``datasets``' json loader, which turns date-like strings into
    timestamps, a column mixing "4" and 4 into numbers, and a ``null`` or ``[1, 2]`` line into rows."""
    rows = [{"answer": "4", "note": "2024-01-01"}, {"answer": 4, "id": 12345678901234567890123}, {"answer": [1]}]
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    assert read_rows(f) == [(f"line {i}", row) for i, row in enumerate(rows, 1)]
    (tmp_path / "mixed.json").write_text(json.dumps({"data": rows}))
    assert read_rows(tmp_path / "mixed.json") == [(f"row {i}", row) for i, row in enumerate(rows, 1)]
    (tmp_path / "null.jsonl").write_text('{"a": 1}\n\nnull\n')
    expect_one_line_error(r"null\.jsonl: line 3: expected a JSON object, got NoneType", tmp_path / "null.jsonl")
    (tmp_path / "list.json").write_text('[{"a": 1}, [1, 2]]')
    expect_one_line_error(r"list\.json: row 2: expected a JSON object, got list", tmp_path / "list.json")


def test_importing_vopd_data_does_not_import_datasets() -> None:
    """``datasets`` takes seconds to import: it is imported by the reader that needs it, not with the module."""
    import subprocess
    import sys

    code = "import sys, vopd.data; print(sorted({'datasets', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
