"""Read local data files into records, naming the file and line of anything malformed.

Every reader returns ``Record``s: a dict of fields plus where it came from, so later
stages (format detection, tokenization) can say "data.jsonl line 17: field 'completion'
is missing" rather than fail deep inside a batch.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.errors import InputError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Record:
    """One example as read from a file."""

    fields: dict[str, Any]
    where: str  # "path line N" / "path row N" / "path item N"


def read_records(path: str | Path) -> list[Record]:
    """Read a JSONL, JSON, CSV, Parquet or TXT file into records.

    TXT holds one document per non-empty line (field ``text``). JSON holds a list of
    objects (or ``{"data": [...]}``). CSV's header row names the fields.

    Raises:
        InputError: missing file, unknown suffix, undecodable bytes, malformed JSON, a
            record that is not an object, or a file without any records.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
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
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                         "re-save the file as UTF-8") from None


def _read_txt(path: Path, text: str) -> list[Record]:
    return [Record({"text": line.strip()}, f"{path} line {i}")
            for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {i}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path} line {i}: each line must be a JSON object, got {type(obj).__name__}")
        records.append(Record(obj, f"{path} line {i}"))
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise InputError(f"{path}: a JSON data file must hold a list of objects (or {{\"data\": [...]}})")
    records = []
    for i, item in enumerate(obj, 1):
        if not isinstance(item, dict):
            raise InputError(f"{path} item {i}: must be a JSON object, got {type(item).__name__}")
        records.append(Record(item, f"{path} item {i}"))
    return records


def _read_csv(path: Path, text: str) -> list[Record]:
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise InputError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if not all(header) or len(set(header)) != len(header):
        raise InputError(f"{path} line 1: the header row must name every column once, got {header}")
    records = []
    for i, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise InputError(f"{path} line {i}: {len(row)} columns, but the header has {len(header)}")
        records.append(Record(dict(zip(header, row)), f"{path} line {i}"))
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
