"""``lmtune compile`` and ``lmtune extract-links``: from files to files, as the CLI and API call them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lmtune.compile.build import DEFAULT_RANK, DEFAULT_SMOOTHING, LINKS_FILE, Compiled, compile_graph, corpus_links
from lmtune.compile.extract import new_links
from lmtune.compile.graph import Link, make_link, merge_links, read_links, sum_duplicates, write_links
from lmtune.data.readers import read_records
from lmtune.errors import InputError
from lmtune.models.loading import load_tokenizer, resolve_model_dir
from lmtune.models.shipped import build_word_tokenizer

GraphLike = str | Path | Iterable[Link | tuple[str, str, float] | Mapping[str, Any]]


def as_links(graph: GraphLike) -> list[Link]:
    """Links from a file path, or from ``Link``s, ``(source, target, weight)`` tuples or dicts."""
    if isinstance(graph, (str, Path)):
        return read_links(graph)
    links = []
    for n, item in enumerate(graph):
        where = f"graph item {n}"
        if isinstance(item, Link):
            item = (item.source, item.target, item.weight)
        elif isinstance(item, Mapping):
            item = (item.get("source"), item.get("target"), item.get("weight"))
        if not isinstance(item, tuple) or len(item) != 3:
            raise InputError(f"{where}: expected a Link, a (source, target, weight) tuple or a dict, got {item!r}")
        links.append(make_link(*item, where))
    if not links:
        raise InputError("the graph is empty: there is nothing to compile")
    return sum_duplicates(links)


def compile_model(graph: GraphLike | None = None, *, out: str | Path, from_corpus: str | Path | None = None,
                  rank: int = DEFAULT_RANK, vocab: str | Path | None = None, smoothing: float = DEFAULT_SMOOTHING,
                  seed: int = 0, quiet: bool = False, **arch: int) -> Compiled:
    """Compile a link graph (or a corpus's bigram counts) into a ``transformers`` model folder.

    Args:
        graph: a link file (TSV/JSONL) or links in memory; exactly one of ``graph`` and
            ``from_corpus``.
        out: the new model folder (must not exist, or be empty).
        from_corpus: a text file (TXT, or JSONL/CSV/... with a ``text`` field) whose bigrams
            become the links.
        rank: K, the singular components kept (at most the vocabulary size).
        vocab: a model folder whose tokenizer the compiled model uses (every graph token must
            be in it); ``None``: a word tokenizer over the graph's (or corpus's) words.
        smoothing: probability share spread evenly over each row, in (0, 1].
        seed: seeds the blocks' zero-gated random weights.
        quiet: no log lines.
        **arch: ``n_layer``, ``n_head``, ``n_positions``, ``n_embd``.

    Returns:
        ``Compiled``: ``out``, ``model``, ``tokenizer`` and ``report`` (errors, components).
    """
    if (graph is None) == (from_corpus is None):
        raise InputError("give exactly one of a graph (--graph LINKS) and a corpus (--from-corpus FILE)")
    say = (lambda _msg: None) if quiet else print
    tokenizer, vocab_name = None, "the vocabulary"
    if vocab is not None:

        tokenizer = load_tokenizer(resolve_model_dir(vocab))
        vocab_name = f"the vocabulary of {vocab}"
    if from_corpus is not None:
        texts = []
        for rec in read_records(from_corpus):
            if not isinstance(rec.fields.get("text"), str):
                raise InputError(f"{rec.where}: field 'text' must be a string")
            texts.append(rec.fields["text"])
        tokenizer = tokenizer or build_word_tokenizer(texts)
        links = corpus_links(texts, tokenizer, str(from_corpus))
    else:
        links = as_links(graph)  # type: ignore[arg-type]
    return compile_graph(links, out, rank, smoothing=smoothing, tokenizer=tokenizer, vocab_name=vocab_name,
                         seed=seed, say=say, **arch)


def extract_to_files(model: str | Path, out: str | Path | None = None, *, top: int = 100, min_prob: float = 0.05,
                     graph: str | Path | None = None, data: str | Path | None = None,
                     merge_into: str | Path | None = None, quiet: bool = False) -> list[Link]:
    """Write the model's strongest links missing from the graph; optionally merge them into a graph file.

    The graph whose links are "already known" is ``graph``, plus ``merge_into``; with neither,
    the ``links.tsv`` a compiled model folder carries.

    Args:
        model: the model folder to read associations from.
        out: where the new links go (TSV or JSONL by suffix; weight = the model's probability).
        top: at most this many links.
        min_prob: only links with at least this probability.
        graph: the input graph (links in it are not extracted).
        data: text to average the associations over (default: one probe per token).
        merge_into: a link file to add the new links to, rewritten atomically (weights scaled by
            :func:`lmtune.compile.graph.merge_links`).
        quiet: no log lines.

    Returns:
        The extracted links (probability weights).
    """
    if out is None and merge_into is None:
        raise InputError("nothing to write: give --out LINKS and/or --merge-into LINKS")
    say = (lambda _msg: None) if quiet else print
    known: list[Link] = []
    sources = [Path(p) for p in (graph, merge_into) if p is not None]
    if not sources and (Path(model) / LINKS_FILE).is_file():
        sources = [Path(model) / LINKS_FILE]
    for path in sources:
        known += read_links(path)
    exclude = {(link.source, link.target) for link in known}
    found = new_links(model, top=top, min_prob=min_prob, exclude=exclude, data=data)
    say(f"{len(found)} links with probability >= {min_prob} not in "
        f"{', '.join(map(str, sources)) if sources else 'any graph (none given)'}")
    for link in found[:10]:
        say(f"  {link.source} -> {link.target}  p={link.weight:.4f}")
    if out is not None:
        write_links(out, found)
        say(f"links written to {out}")
    if merge_into is not None:
        target = read_links(merge_into)
        merged, added = merge_links(target, found)
        write_links(merge_into, merged)
        say(f"{len(added)} links merged into {merge_into} ({len(merged)} links now)")
    return found
