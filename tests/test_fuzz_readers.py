"""Bad data never crashes: generated malformed files thrown at every reader and example builder.

Each generated file either loads, or raises ``lmtune.errors.InputError`` whose message names
the file and the line (item, row) — or, for a problem of the whole file (empty, not a list,
not Parquet at all), the file. Never another exception, never a hang: every call runs under a
wall-clock alarm as well as Hypothesis' deadline.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import signal
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SENTENCES, word_tokenizer
from lmtune.config import load_config
from lmtune.data.readers import Record, read_records
from lmtune.errors import InputError

COMMON = dict(deadline=timedelta(seconds=5), derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
# Example counts per test (also quoted in docs/reliability.md).
N_JSONL, N_JSON, N_CSV, N_TXT, N_PARQUET, N_PARQUET_BYTES, N_BUILDER = 120, 80, 80, 50, 40, 40, 50

FIELDS = ["text", "prompt", "completion", "instruction", "input", "output", "messages", "conversations",
          "chosen", "rejected", "label", "text_pair", "role", "content", "from", "value", "margin", "task"]
WHERE = re.compile(r"\b(line|item|row) \d+")
WHOLE_FILE = re.compile(r"no examples|must hold a list|not a readable Parquet|nested too deeply|"
                        r"unreadable JSON value")


@contextlib.contextmanager
def no_hang(seconds: float = 20) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a call that runs past ``seconds``."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no answer in {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_or_input_error(path: Path) -> list[Record] | None:
    """The property: records, or an InputError naming the file (and the line where it has one)."""
    try:
        with no_hang():
            records = read_records(path)
    except InputError as e:
        msg = str(e)
        assert str(path) in msg, msg
        assert WHERE.search(msg) or WHOLE_FILE.search(msg), f"no line/item/row in: {msg}"
        return None
    assert records and all(isinstance(r, Record) and isinstance(r.fields, dict) for r in records)
    assert all(str(path) in r.where and WHERE.search(r.where) for r in records)
    return records


# ---- values and records -------------------------------------------------------------------

huge_text = st.integers(10_000, 200_000).map(lambda n: "the cat " * (n // 8))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\u2028", "\x00", "<bos>", "é☃😀", "\r\n"]),
                  st.lists(st.sampled_from(SENTENCES), max_size=4).map(" ".join), huge_text)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10**40, 10**40),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
turns = st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "x"]) |
                                                      json_values, "content": texts | json_values,
                                                      "from": st.sampled_from(["human", "gpt"]),
                                                      "value": texts}), max_size=4)
records = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10),
                          st.one_of(texts, json_values, turns, st.integers(0, 3)), max_size=6)


def _mutate(data: bytes, how: str, at: float) -> bytes:
    """Break valid bytes: cut them short, flip a byte, splice invalid UTF-8 or a bad escape in."""
    i = int(at * len(data))
    return {"cut": data[:i],
            "flip": data[:i] + bytes([(data[i] if i < len(data) else 0) ^ 0x5A]) + data[i + 1:],
            "bad_utf8": data[:i] + b"\xff\xc3(" + data[i:],
            "lone_surrogate": data.replace(b'"the', b'"\\ud800the', 1),
            "deep": data[:i] + b"[" * 5000 + data[i:],
            "huge_int": data[:i] + b"9" * 5000 + data[i:],
            "nul": data[:i] + b"\x00" + data[i:],
            "none": data}[how]


mutations = st.tuples(st.sampled_from(["none", "none", "cut", "flip", "bad_utf8", "lone_surrogate", "deep",
                                       "huge_int", "nul"]), st.floats(0, 1))


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["record", "record", "record", "value", "blank", "garbage"]))
        if kind == "record":
            line = json.dumps(draw(records), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
        elif kind == "value":
            line = json.dumps(draw(json_values)).encode()
        elif kind == "blank":
            line = draw(st.sampled_from([b"", b"   ", b"\r"]))
        else:
            line = draw(st.binary(max_size=30))
        how, at = draw(mutations)
        lines.append(_mutate(line, how, at))
    return draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)


@st.composite
def json_files(draw: st.DrawFn) -> bytes:
    items = draw(st.lists(records | json_values, max_size=5))
    top: Any = {"data": items, "other": draw(json_values)} if draw(st.booleans()) else items
    if draw(st.integers(0, 9)) == 0:
        top = draw(json_values)  # not a list at all
    data = json.dumps(top, indent=draw(st.sampled_from([None, 1, 2]))).encode()
    how, at = draw(mutations)
    return _mutate(data, how, at)


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    import csv

    cell = st.one_of(texts, st.sampled_from(['"', '""', ",", "\n", "a\"b", "'", "\\"]))
    header = draw(st.lists(st.sampled_from(FIELDS) | st.sampled_from(["", " ", "text"]), min_size=0, max_size=4))
    buf = io.StringIO()
    writer = csv.writer(buf)
    if header or draw(st.booleans()):
        writer.writerow(header)
    for _ in range(draw(st.integers(0, 5))):
        writer.writerow(draw(st.lists(cell, max_size=len(header) + 1)))
    data = buf.getvalue().encode("utf-8")
    if draw(st.integers(0, 4)) == 0:
        data += draw(st.binary(max_size=20))  # a row of raw bytes
    how, at = draw(mutations)
    return _mutate(data, how, at)


@st.composite
def txt_files(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(texts | st.sampled_from(["\x0c", "\x1c", "\x85"]), max_size=6))
    data = draw(st.sampled_from(["\n", "\r\n", "\r"])).join(lines).encode("utf-8")
    how, at = draw(mutations)
    return _mutate(data, how, at)


@pytest.mark.parametrize(("suffix", "files", "n"), [(".jsonl", jsonl_files(), N_JSONL), (".json", json_files(), N_JSON),
                                                     (".csv", csv_files(), N_CSV), (".txt", txt_files(), N_TXT)])
def test_text_readers_load_or_name_file_and_line(tmp_path, suffix, files, n):
    @settings(max_examples=n, **COMMON)
    @given(data=files)
    def check(data: bytes) -> None:
        path = tmp_path / f"data{suffix}"
        path.write_bytes(data)
        load_or_input_error(path)

    check()


# ---- Parquet --------------------------------------------------------------------------------

PARQUET_COLUMNS = {
    "string": st.one_of(st.none(), texts),
    "int": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
    "float": st.floats(allow_nan=True, allow_infinity=True),
    "binary": st.binary(max_size=20),
    "list": st.lists(texts, max_size=3),
    "struct": st.fixed_dictionaries({"role": texts, "content": texts}),
    "turns": st.lists(st.fixed_dictionaries({"role": texts, "content": texts}), max_size=3),
}


@st.composite
def parquet_tables(draw: st.DrawFn) -> Any:
    import pyarrow as pa

    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True))
    kinds = [draw(st.sampled_from(sorted(PARQUET_COLUMNS))) for _ in names]
    columns = {name: draw(st.lists(PARQUET_COLUMNS[k], min_size=n, max_size=n)) for name, k in zip(names, kinds)}
    return pa.table(columns)


def test_parquet_reader_loads_generated_tables(tmp_path):
    import pyarrow.parquet as pq

    @settings(max_examples=N_PARQUET, **COMMON)
    @given(table=parquet_tables())
    def check(table: Any) -> None:
        path = tmp_path / "data.parquet"
        pq.write_table(table, path)
        records = load_or_input_error(path)
        if table.num_rows:
            assert records is not None and len(records) == table.num_rows
            assert set(records[0].fields) == set(table.column_names)

    check()


def test_parquet_reader_refuses_damaged_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": SENTENCES, "label": list(range(len(SENTENCES)))}), buf)
    valid = buf.getvalue()

    @settings(max_examples=N_PARQUET_BYTES, **COMMON)
    @given(data=st.one_of(st.binary(max_size=200), st.tuples(mutations, st.just(valid)).map(
        lambda m: _mutate(m[1], m[0][0], m[0][1]))))
    def check(data: bytes) -> None:
        path = tmp_path / "data.parquet"
        path.write_bytes(data)
        load_or_input_error(path)

    check()


# ---- example builders: records of any shape -> examples, or InputError naming the line --------

def _byte_level_tokenizer() -> Any:
    """A byte-level BPE tokenizer: encodes any text, unlike the word-level one."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    core = ByteLevelBPETokenizer()
    core.train_from_iterator(SENTENCES, vocab_size=300, special_tokens=["<bos>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=core._tokenizer, bos_token="<bos>", eos_token="<bos>",
                                   pad_token="<bos>")


TOKENIZERS = {"word": word_tokenizer(), "byte": _byte_level_tokenizer()}


def near_valid(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict]:
    """Records of a format with up to two faults: a field dropped, of the wrong type, or one extra."""
    @st.composite
    def build(draw: st.DrawFn) -> dict:
        rec = {k: draw(v) for k, v in fields.items()}
        for _ in range(draw(st.integers(0, 2))):
            how, key = draw(st.sampled_from(["drop", "wrong_type", "extra"])), draw(st.sampled_from(sorted(fields)))
            if how == "drop":
                rec.pop(key, None)
            elif how == "wrong_type":
                rec[key] = draw(json_values)
            else:
                rec[draw(st.sampled_from(FIELDS) | st.text(max_size=8))] = draw(json_values)
        return rec

    return build()


def _text_builder(recs: list[Record], tok: Any) -> list[dict]:
    from lmtune.objectives.lm_task import text_examples

    return text_examples(recs, tok, 32)[0]


def _sft_builder(fmt: str) -> Callable[[list[Record], Any], list[dict]]:
    def build(recs: list[Record], tok: Any) -> list[dict]:
        from lmtune.data.chat import ensure_chat_template
        from lmtune.objectives.sft_task import sft_examples

        if fmt == "messages":  # as sft_task.build_task does; on a copy, as it adds ChatML tokens
            tok = copy.deepcopy(tok)
            ensure_chat_template(tok)
        return sft_examples(recs, fmt, tok, 32, "response")[0]

    return build


def _preference_builder(recs: list[Record], tok: Any) -> list[dict]:
    from lmtune.data.preference import build_pairs

    pairs = build_pairs(recs, tok, 32, margin=True)[0]
    return [{"input_ids": p["prompt_ids"] + p[side], "labels": p["prompt_ids"] + p[side]}
            for p in pairs for side in ("chosen_ids", "rejected_ids")]


def _prompts_builder(recs: list[Record], tok: Any) -> list[dict]:
    from types import SimpleNamespace

    from lmtune.objectives.ppo_task import load_prompts

    ctx = SimpleNamespace(records=lambda key: recs, tokenizer=tok, cfg=load_config(train={"max_length": 32}),
                          source=lambda key: "x")
    return [{"input_ids": ids, "labels": ids} for _, ids, _ in load_prompts(ctx, "data.train")]


def _classification_builder(recs: list[Record], tok: Any) -> list[dict]:
    from lmtune.data.classification import build_examples, label_key, label_names
    from lmtune.data.examples import BuildStats

    names = label_names(label_key(r.fields.get("label"), r.where) for r in recs)
    examples = build_examples(recs, tok, 32, False, names, 0, BuildStats())
    return [{"input_ids": ex["input_ids"], "labels": ex["input_ids"]} for ex in examples]


role = st.sampled_from(["user", "assistant", "system", "human", "gpt", "robot", ""])
conversation = st.lists(st.fixed_dictionaries({"role": role, "content": texts}), min_size=0, max_size=4)

# format -> (builder(records, tokenizer) -> examples, its fields); every builder on main belongs here.
BUILDERS: dict[str, tuple[Callable[[list[Record], Any], list[dict]], dict[str, st.SearchStrategy]]] = {
    "text": (_text_builder, {"text": texts}),
    "prompt_completion": (_sft_builder("prompt_completion"), {"prompt": texts, "completion": texts}),
    "alpaca": (_sft_builder("alpaca"), {"instruction": texts, "input": texts, "output": texts}),
    "messages": (_sft_builder("messages"), {"messages": conversation}),
    "conversations": (_sft_builder("messages"), {"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system", "x"]), "value": texts}), max_size=4)}),
    "prompts": (_prompts_builder, {"prompt": texts}),
    "classification": (_classification_builder, {"text": texts, "text_pair": texts,
                                                 "label": st.integers(0, 3) | st.sampled_from(["pos", "neg", ""])}),
    "preference": (_preference_builder, {"prompt": texts, "chosen": texts, "rejected": texts,
                                         "margin": st.floats(allow_nan=True) | texts}),
}


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_builders_build_or_name_file_and_line(tmp_path, fmt):
    build, fields = BUILDERS[fmt]

    @settings(max_examples=N_BUILDER, **COMMON)
    @given(recs=st.lists(st.one_of(near_valid(fields), near_valid(fields), records), min_size=1, max_size=4),
           tok_name=st.sampled_from(sorted(TOKENIZERS)))
    def check(recs: list[dict], tok_name: str) -> None:
        tok = TOKENIZERS[tok_name]
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        loaded = load_or_input_error(path)
        if loaded is None:
            return
        try:
            with no_hang():
                examples = build(loaded, tok)
        except InputError as e:
            assert str(path) in str(e) and WHERE.search(str(e)), str(e)
            return
        for ex in examples:
            ids, labels = ex["input_ids"], ex["labels"]
            assert len(ids) == len(labels) <= 32 and all(0 <= i < len(tok) + 8 for i in ids)

    check()
