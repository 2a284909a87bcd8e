"""Read local data files into records, naming the file and line of anything malformed.

Every reader returns ``Record``s: a dict of fields plus where it came from, so later
stages (format detection, tokenization) can say "data.jsonl line 17: field 'completion'
is missing" rather than fail deep inside a batch. Whatever the bytes, a reader either
returns records or raises ``InputError`` naming the file (and line, item or row).
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.errors import InputError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) would refuse long documents


@dataclass(frozen=True)
class Record:
    """One example as read from a file."""

    fields: dict[str, Any]
    where: str  # "path line N" / "path line N (item K)" / "path row N" / "data[K]"


def records_from_rows(rows: Iterable[Mapping[str, Any]], source: str = "<data>") -> list[Record]:
    """Records from in-memory rows: a list of dicts, a ``datasets.Dataset``, any iterable of mappings.

    Each record's ``where`` names its row (``data[3]``), so later errors point at it as they
    point at a file's line.

    Args:
        rows: the examples, one mapping of field name to value each.
        source: how errors name the collection (the argument it was passed as).

    Raises:
        InputError: ``rows`` is a string or a mapping rather than a collection of rows, a row is
            not a mapping, a field name is not a string, a string is not valid Unicode, or there
            are no rows.
    """
    if isinstance(rows, (str, bytes, Path)):
        raise InputError(f"{source}: expected a list of rows here, got {type(rows).__name__}; pass a file path "
                         "as a str or Path where a path is accepted, or a list of dicts")
    if isinstance(rows, Mapping):
        hint = (" (a DatasetDict: pick a split, e.g. dataset['train'])" if all(hasattr(v, "column_names")
                                                                             for v in rows.values()) and rows
                else " (for columns of equal length, pass datasets.Dataset.from_dict(...) or a list of dicts)")
        raise InputError(f"{source}: expected a list of rows, got a mapping{hint}")
    if hasattr(rows, "columns") and hasattr(rows, "to_dict"):  # iterating a DataFrame yields column names
        raise InputError(f"{source}: got a pandas DataFrame; pass df.to_dict('records') or "
                         "datasets.Dataset.from_pandas(df)")
    if not isinstance(rows, Iterable):
        raise InputError(f"{source}: expected a list of dicts or a datasets.Dataset, got {type(rows).__name__}")
    records = []
    for i, row in enumerate(rows):
        where = f"{source}[{i}]"
        if not isinstance(row, Mapping):
            raise InputError(f"{where}: each row must be a mapping of field names to values (a dict), got "
                             f"{type(row).__name__}")
        bad = [k for k in row if not isinstance(k, str)]
        if bad:
            raise InputError(f"{where}: field names must be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
        fields = dict(row)
        _check_unicode(fields, where)
        records.append(Record(fields, where))
    if not records:
        raise InputError(f"{source}: no examples (the collection is empty)")
    return records


def read_records(path: str | Path) -> list[Record]:
    """Read a JSONL, JSON, CSV, Parquet or TXT file into records.

    TXT holds one document per non-empty line (field ``text``). JSON holds a list of
    objects (or ``{"data": [...]}``). CSV's header row names the fields. Lines are split at
    ``\\n`` only (as editors count them), so a U+2028 inside a JSON string stays in it.

    Raises:
        InputError: missing or unreadable file, unknown suffix, undecodable bytes, malformed
            JSON or CSV, a record that is not an object, or a file without any records.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"data file {path} does not exist")
    if not path.is_file():
        raise InputError(f"data file {path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported data file type '{suffix}'; use one of {', '.join(SUFFIXES)}")
    if suffix == ".parquet":
        records = _read_parquet(path)
    else:
        text = _read_text(path)
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_txt}[suffix]
        records = reader(path, text)
    if not records:
        raise InputError(f"{path}: no examples (the file is empty)")
    return records


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                         "re-save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _read_txt(path: Path, text: str) -> list[Record]:
    return [Record({"text": line.strip()}, f"{path} line {i}")
            for i, line in enumerate(_lines(text), 1) if line.strip()]


def _parse_json(text: str, where: str) -> Any:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer literal with more digits than Python converts
        raise InputError(f"{where}: unreadable JSON value ({e})") from None
    _check_unicode(obj, where)
    return obj


def _check_unicode(obj: Any, where: str) -> None:
    """Refuse lone surrogates (``"\\ud800"``): valid JSON escapes, but not text any tokenizer takes."""
    try:
        found = _lone_surrogate(obj, "")
    except RecursionError:  # nested as deep as the parser allows: builders refuse such fields anyway
        return
    if found is not None:
        field, chars = found
        raise InputError(f"{where}: field '{field}' holds characters that are not valid Unicode (an unpaired "
                         f"surrogate escape {chars!r}); fix the \\uXXXX escape")


def _lone_surrogate(obj: Any, path: str) -> tuple[str, str] | None:
    """``(field path, offending characters)`` of the first string that is not encodable text."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return path or "(value)", obj[e.start:e.end]
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        found = _lone_surrogate(key, sub) if isinstance(key, str) else None
        found = found or _lone_surrogate(value, sub)
        if found is not None:
            return found
    return None


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for i, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        where = f"{path} line {i}"
        obj = _parse_json(line, where)
        if not isinstance(obj, dict):
            raise InputError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
        records.append(Record(obj, where))
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:
        raise InputError(f"{path}: unreadable JSON value ({e})") from None
    wrapped = isinstance(obj, dict) and isinstance(obj.get("data"), list)
    if wrapped:
        obj = obj["data"]
    if not isinstance(obj, list):
        raise InputError(f"{path}: a JSON data file must hold a list of objects (or {{\"data\": [...]}})")
    lines = _item_lines(text, wrapped)
    records = []
    for i, item in enumerate(obj, 1):
        where = f"{path} line {lines[i - 1]} (item {i})" if lines else f"{path} item {i}"
        if not isinstance(item, dict):
            raise InputError(f"{where}: must be a JSON object, got {type(item).__name__}")
        _check_unicode(item, where)
        records.append(Record(item, where))
    return records


def _item_lines(text: str, wrapped: bool) -> list[int] | None:
    """The line each item of the data array starts on (the text is known to be valid JSON)."""
    dec = json.JSONDecoder()
    try:
        i = _WS.match(text).end()
        if wrapped:
            i = _data_value_start(dec, text, i)
        starts = []
        i = _WS.match(text, i + 1).end()
        while text[i] != "]":
            starts.append(i)
            i = _WS.match(text, dec.raw_decode(text, i)[1]).end()
            if text[i] == ",":
                i = _WS.match(text, i + 1).end()
    except (ValueError, IndexError, RecursionError):
        return None
    newlines = [m.start() for m in re.finditer("\n", text)]
    return [bisect.bisect_right(newlines, s) + 1 for s in starts]


def _data_value_start(dec: json.JSONDecoder, text: str, i: int) -> int:
    """Offset of the value of the last ``"data"`` key of the object at ``i`` (json.loads keeps the last)."""
    found = None
    i = _WS.match(text, i + 1).end()
    while text[i] != "}":
        key, i = dec.raw_decode(text, i)
        i = _WS.match(text, _WS.match(text, i).end() + 1).end()  # past ':'
        if key == "data":
            found = i
        i = _WS.match(text, dec.raw_decode(text, i)[1]).end()
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()
    if found is None:
        raise ValueError("no data key")
    return found


def _read_csv(path: Path, text: str) -> list[Record]:
    old_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, list[str]]] = []
    try:
        start = 1
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    finally:
        csv.field_size_limit(old_limit)
    if not rows:
        return []
    header = [h.strip() for h in rows[0][1]]
    if not all(header) or len(set(header)) != len(header):
        raise InputError(f"{path} line 1: the header row must name every column once, got {header}")
    records = []
    for line, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise InputError(f"{path} line {line}: {len(row)} columns, but the header has {len(header)}")
        records.append(Record(dict(zip(header, row)), f"{path} line {line}"))
    return records


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    return [Record(row, f"{path} row {i}") for i, row in enumerate(rows, 1)]
