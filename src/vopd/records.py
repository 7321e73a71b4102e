"""The rows of local data files: jsonl / json / csv / parquet files and ``datasets`` ``save_to_disk`` directories.

What it knows: reading a local file into ``(location, row)`` pairs (``line 3`` for jsonl, ``row 3`` otherwise) with
one-line ``UserError``s that name the file and the line (missing, empty, not UTF-8, malformed, a csv row with fewer
cells than its header unless the missing columns are ones the caller calls optional). csv and parquet files
and ``save_to_disk`` directories are read with Hugging Face ``datasets`` (offline, in a throwaway cache, so an edited
file is always read afresh); jsonl and json files with the ``json`` module, because ``datasets``' json loader changes
values (strings that look like dates become timestamps, a column mixing "4" and 4 becomes numbers, a ``null`` or
``[1, 2]`` line becomes rows) and cannot name a malformed line. What it does not know: what the rows mean (prompts,
conversations, benchmark problems: ``vopd.data``), tokenizers, or anything remote: it never downloads a dataset.
"""

from __future__ import annotations

import csv
import json
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Collection, Iterator, Literal

from vopd.errors import UserError

def one_line(text: object) -> str:
    """``text`` on one line (whitespace runs collapsed), for error messages."""
    return " ".join(str(text).split())


def read_rows(path: str | Path, *, optional: Collection[str] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a local .jsonl/.ndjson, .json (a list, or an object holding one list such as ``{"data": [...]}``),
    .csv or .parquet file, or of a Hugging Face ``datasets`` ``save_to_disk`` directory, each with its location
    (``line 3`` for jsonl, counting blank lines, ``row 3`` otherwise, 1-based).

    csv and parquet files are read with ``datasets.load_dataset`` (offline, in a temporary cache removed after the
    read, so an edited file is never served from a stale cache), directories with ``datasets.load_from_disk``;
    csv cells stay text as written (an answer "007" is not the number 7, an empty cell is "", "NA" is "NA"); a csv
    row with fewer cells than the header is an error (a cell holding an unquoted line break splits its row in two),
    unless every column it lacks is in ``optional``: those are left out of the row.
    jsonl and json files are read with the ``json`` module, which keeps every value as written and names the
    malformed line; ``datasets``' json loader does neither (see the module docstring).

    Raises ``UserError`` (one line, naming the file and the line) for a missing, empty, unreadable or malformed file.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        rows = _read_saved_dataset(p)
        if not rows:
            raise UserError(f"{p}: the dataset has no rows")
        return rows
    readers: dict[str, Callable[[Path], list[tuple[str, dict[str, Any]]]]] = {
        ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
        ".csv": lambda csv_path: _read_csv(csv_path, optional), ".parquet": _read_parquet
    }
    reader = readers.get(p.suffix.lower())
    if reader is None:
        raise UserError(f"{p}: unsupported file type {p.suffix!r}; use .jsonl, .json, .csv or .parquet")
    try:
        rows = reader(p)
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not UTF-8 text ({one_line(exc)})") from None
    if not rows:
        raise UserError(f"{p}: the file has no rows")
    return rows


def _datasets(p: Path) -> ModuleType:
    """The ``datasets`` library, imported on first use (it takes seconds to import)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{p}: reading this file needs the datasets library, a dependency of vopd that is missing "
                        "here: pip install 'datasets>=2.14'") from None
    return datasets


@contextmanager
def _quiet(datasets: ModuleType) -> Iterator[None]:
    """No progress bar and no log line from ``datasets`` while it reads (vopd reports failures itself, in one
    line); its settings are restored afterwards."""
    verbosity = datasets.logging.get_verbosity()
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns when HF_DATASETS_DISABLE_PROGRESS_BARS=0 keeps the bars on
        datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datasets.utils.enable_progress_bars()


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain: ``datasets`` wraps the reader's error in a DatasetGenerationError whose
    own message ("An error occurred while generating the dataset") names nothing."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def _load_file(p: Path, builder: Literal["csv", "parquet"], **config: object) -> list[dict[str, Any]]:
    """The rows of one local file read with ``datasets.load_dataset(builder)``: offline (``local_files_only``),
    into a temporary cache deleted afterwards (nothing is left in ``~/.cache/huggingface``, and the next read of an
    edited file builds afresh), the table held in memory. A failure raises the innermost exception (or
    ``UnicodeDecodeError`` for bytes that are not UTF-8)."""
    datasets = _datasets(p)
    with _quiet(datasets), tempfile.TemporaryDirectory(prefix="vopd-datasets-", ignore_cleanup_errors=True) as cache:
        try:
            data = datasets.load_dataset(
                builder, data_files=str(p.resolve()), split="train", cache_dir=cache, keep_in_memory=True,
                download_config=datasets.DownloadConfig(local_files_only=True, cache_dir=cache), **config)
        except Exception as exc:  # noqa: BLE001 - the loaders raise many types; the caller names the file
            raise _root_cause(exc) from None
        rows: list[dict[str, Any]] = data.to_list()
    return rows


def _read_saved_dataset(p: Path) -> list[tuple[str, dict[str, Any]]]:
    """A ``Dataset.save_to_disk`` directory (or a ``DatasetDict``'s with one split), read with ``datasets`` (local:
    ``load_from_disk`` never touches the hub)."""
    if not ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        raise UserError(f"{p}: is a directory but not a datasets save_to_disk directory (no state.json or "
                        "dataset_dict.json); pass a .jsonl, .json, .csv or .parquet file, or such a directory")
    state = p / "state.json"
    if state.is_file() and not json.loads(state.read_text(encoding="utf-8")).get("_data_files", True):
        return []  # an empty dataset: no shard to read (load_from_disk itself fails on it)
    datasets = _datasets(p)
    try:
        data = datasets.load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001 - datasets raises several types for a damaged directory
        raise UserError(f"{p}: not a readable datasets directory ({one_line(exc)})") from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise UserError(f"{p}: holds the splits {', '.join(data)}; pass one split's directory, e.g. "
                            f"{p / next(iter(data))}")
        data = next(iter(data.values()))
    return [(f"row {i}", dict(row)) for i, row in enumerate(data.to_list(), 1)]


def _read_jsonl(p: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{p}: line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{p}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((f"line {lineno}", obj))
    return rows


def _read_json(p: Path) -> list[tuple[str, dict[str, Any]]]:
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "a file with one object per line must be named .jsonl"
        ) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        key = "data" if "data" in lists else (lists[0] if len(lists) == 1 else None)
        if key is None:
            raise UserError(f"{p}: expected a list of rows or an object with one list (e.g. 'data'); found keys "
                            f"{', '.join(map(str, data)) or 'none'}")
        data = data[key]
    if not isinstance(data, list):
        raise UserError(f"{p}: expected a list of rows, got {type(data).__name__}")
    for i, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise UserError(f"{p}: row {i}: expected a JSON object, got {type(obj).__name__}")
    return [(f"row {i}", obj) for i, obj in enumerate(data, 1)]


def _read_csv(p: Path, optional: Collection[str]) -> list[tuple[str, dict[str, Any]]]:
    """A csv file with a header line, every cell read as the text written (``datasets`` would otherwise infer
    numbers and turn "NA" or empty cells into None). A header naming a column twice, or a row with more cells than
    the header, is an error rather than a silently dropped or shifted cell; so is a row with fewer cells, unless the
    columns it lacks are ``optional`` (``datasets`` reads a missing cell as an empty one)."""
    with p.open(encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is not part of the first name
        records = csv.reader(f)
        header = next((names for names in records if names), None)
        # Each row's cell count. Blank lines are no rows, for datasets (pandas) too, nor are lines of spaces (a
        # quoted "" is a row).
        counts = [len(cells) for cells in records if cells and (len(cells) > 1 or not cells[0] or cells[0].strip())]
    if header is None:
        return []
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise UserError(f"{p}: the header names the column{'s' * (len(twice) > 1)} "
                        f"{', '.join(map(repr, twice))} more than once")
    datasets = _datasets(p)
    features = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        with warnings.catch_warnings():
            # pandas drops the extra cells of a first row longer than the header with only this warning
            warnings.filterwarnings("error", message="Length of header or names does not match length of data")
            rows = _load_file(p, "csv", features=features, column_names=header, header=0, index_col=False,
                              na_filter=False)
    except UnicodeDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas and datasets raise many types for a malformed file
        if not counts:
            return []  # header only: datasets refuses an empty split
        raise UserError(f"{p}: not a readable csv file ({one_line(exc)})") from None
    if len(rows) != len(counts):  # the two readers disagree on where rows end: no cell count can be trusted
        raise UserError(f"{p}: not a readable csv file ({len(rows)} rows for {len(counts)} csv records)")
    out = []
    for i, (count, row) in enumerate(zip(counts, rows), 1):
        missing = header[count:]
        if any(name not in optional for name in missing):
            raise UserError(f"{p}: row {i}: has {count} of the header's {len(header)} cells (no "
                            f"{', '.join(map(repr, missing))}): write every cell (an empty one as nothing between two "
                            "commas), and quote a cell that holds a line break")
        out.append((f"row {i}", {k: v for k, v in row.items() if k not in missing}))
    return out


def _read_parquet(p: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        rows = _load_file(p, "parquet")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        if _parquet_rows(p) == 0:
            return []  # a valid file with no rows: datasets refuses an empty split
        raise UserError(f"{p}: not a readable parquet file ({one_line(exc)})") from None
    return [(f"row {i}", row) for i, row in enumerate(rows, 1)]


def _parquet_rows(p: Path) -> int | None:
    """The row count in a parquet file's footer, or None when the file is not parquet."""
    try:
        import pyarrow.parquet as pq

        rows: int = pq.ParquetFile(p).metadata.num_rows
    except Exception:  # noqa: BLE001 - a damaged file fails in several ways
        return None
    return rows
