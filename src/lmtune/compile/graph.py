"""Link files: weighted, directed links between tokens, read and written as TSV or JSONL.

A link ``source -> target`` with weight ``w`` says "after *source*, *target* comes next, with
strength w" (a bigram count, or any positive score). Two formats, chosen by the file suffix:

- ``.jsonl``: one object per line, ``{"source": "the", "target": "cat", "weight": 3}``.
- anything else (``.tsv``, ``.txt``): ``source<TAB>target<TAB>weight`` per line; an optional
  first line ``source	target	weight`` is a header; blank lines and lines starting with ``#``
  are skipped.

Weights must be positive and finite: they become next-token probabilities (each source's weights
divided by their sum), and a negative or zero strength has no probability to be. A link given
twice has the sum of its weights, as two counts of one bigram would. Every problem raises
``InputError`` naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmtune.errors import InputError

FIELDS = ("source", "target", "weight")


@dataclass(frozen=True)
class Link:
    """One directed link and where it was read from (``where`` is empty for links made in memory)."""

    source: str
    target: str
    weight: float
    where: str = ""


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json")


def read_links(path: str | Path) -> list[Link]:
    """Read a link file; duplicate (source, target) pairs are summed, first occurrence's order kept.

    Raises:
        InputError: missing or unreadable file, a malformed line (named by number), a weight
            that is not a positive finite number, or a file without any link.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"link file {path} does not exist (give a .tsv or .jsonl file of source, target, weight)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    parse = _parse_jsonl if _is_jsonl(path) else _parse_tsv
    links = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path} line {n}"
        fields = parse(line, where)
        if fields is None:  # the TSV header
            continue
        links.append(make_link(*fields, where))
    if not links:
        raise InputError(f"{path}: the graph is empty (no links); each line needs source, target and weight")
    return sum_duplicates(links)


def _parse_tsv(line: str, where: str) -> tuple[object, object, object] | None:
    parts = line.split("\t")
    if len(parts) != 3:
        raise InputError(f"{where}: expected 3 tab-separated fields (source, target, weight), got {len(parts)}: "
                         f"{line[:80]!r}")
    if tuple(p.strip().lower() for p in parts) == FIELDS:
        return None
    return parts[0], parts[1], parts[2]


def _parse_jsonl(line: str, where: str) -> tuple[object, object, object]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object with source, target and weight, got {type(obj).__name__}")
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = sorted(set(obj) - set(FIELDS))
    if extra:
        raise InputError(f"{where}: unknown field(s) {', '.join(extra)}; a link has only source, target, weight")
    return obj["source"], obj["target"], obj["weight"]


def make_link(source: object, target: object, weight: object, where: str) -> Link:
    """A checked link: non-empty single tokens, a positive finite weight; errors name ``where``."""
    for name, value in (("source", source), ("target", target)):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: {name} must be a non-empty token, got {value!r}")
        if any(c.isspace() for c in value):
            raise InputError(f"{where}: {name} {value!r} contains whitespace; a link joins two single tokens")
    if isinstance(weight, bool):
        raise InputError(f"{where}: weight must be a number, got {weight!r}")
    try:
        w = float(weight)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{where}: weight must be a number, got {weight!r}") from None
    if not math.isfinite(w) or w <= 0:
        raise InputError(f"{where}: weight {weight!r} must be a positive finite number (weights become "
                         "next-token probabilities; drop the link instead of giving it weight 0 or less)")
    return Link(source, target, w, where)  # type: ignore[arg-type]


def sum_duplicates(links: Iterable[Link]) -> list[Link]:
    """One link per (source, target), weights summed, in order of first appearance."""
    merged: dict[tuple[str, str], Link] = {}
    for link in links:
        key = (link.source, link.target)
        old = merged.get(key)
        merged[key] = link if old is None else Link(old.source, old.target, old.weight + link.weight, old.where)
    return list(merged.values())


def write_links(path: str | Path, links: Iterable[Link]) -> None:
    """Write links in the format the suffix names, through a temporary file (never half a file)."""
    path = Path(path)
    lines = []
    for link in links:
        if _is_jsonl(path):
            lines.append(json.dumps({"source": link.source, "target": link.target, "weight": link.weight}))
        else:
            lines.append(f"{link.source}\t{link.target}\t{link.weight!r}")
    header = [] if _is_jsonl(path) else ["\t".join(FIELDS)]
    write_text_atomic(path, "".join(line + "\n" for line in header + lines))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def out_weights(links: Iterable[Link]) -> dict[str, float]:
    """Total weight leaving each source."""
    totals: dict[str, float] = {}
    for link in links:
        totals[link.source] = totals.get(link.source, 0.0) + link.weight
    return totals


def merge_links(graph: list[Link], new: list[Link]) -> tuple[list[Link], list[Link]]:
    """Add extracted links (weights are probabilities ``p``) to a weighted graph.

    A new link ``s -> t`` with probability ``p`` gets weight ``p * T(s)``, where ``T(s)`` is the
    weight leaving ``s`` in ``graph`` (the mean over sources when ``s`` has none): the count it
    would have if ``s``'s transitions followed the model. Links already in ``graph`` are kept as
    they are, not added to.

    Returns:
        ``(merged graph, the links actually added with their new weights)``.
    """
    totals = out_weights(graph)
    mean_total = sum(totals.values()) / max(len(totals), 1)
    have = {(link.source, link.target) for link in graph}
    added = [Link(link.source, link.target, link.weight * totals.get(link.source, mean_total))
             for link in new if (link.source, link.target) not in have]
    return list(graph) + added, added
