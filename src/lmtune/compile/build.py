"""Compile a link graph into a GPT-2 model folder whose next-token logits are the rank-K matrix.

The architecture is the shipped one (GPT-2, word tokenizer) with untied input and output
matrices. With every block's residual branches zeroed (attention and MLP output projections,
weights and biases) and the position table zeroed, the hidden state reaching the final
LayerNorm is the token's embedding row ``e_x``, and the logits are
``lm_head(ln_f(e_x))``. LayerNorm stands in the way of ``logits = rows[x] @ cols.T``; it is
made exact rather than approximate::

    e_x = [ rows[x] (K) | 0 ... 0 (padding) | t_x, z_x ]        width d >= K + 2

    t_x + z_x = -sum(rows[x])                  -> mean(e_x) = 0, so LayerNorm subtracts nothing
    t_x^2 + z_x^2 = R^2 - |rows[x]|^2          -> |e_x| = R for every token, so LayerNorm divides
                                                  every row by the same c = sqrt(R^2 / d + eps)

With ``ln_f`` weight 1 and bias 0, ``ln_f(e_x) = e_x / c``; the output matrix is
``[cols * c | 0 | 0, 0]``, so the two balancing coordinates and the padding meet zero columns
and ``logits[x] = rows[x] @ cols.T`` exactly (in exact arithmetic; in float32 to ~1e-6). A
real solution needs ``2 (R^2 - |rows[x]|^2) >= sum(rows[x])^2``; R is the smallest radius that
allows it for every token, times a margin.

The blocks start as the identity but are not dead: the output projections get gradients at
the first step, so fine-tuning grows attention and MLP contributions from zero.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtune.compile.graph import Link, write_links
from lmtune.compile.matrix import Factors, dominant_links, factorise, graph_matrix
from lmtune.data.examples import encode
from lmtune.errors import InputError
from lmtune.models.loading import save_model
from lmtune.models.shipped import BOS, build_word_tokenizer, corpus_words, small_gpt_config

MAX_VOCAB = 8192  # the matrix is dense V x V float64: 8192^2 * 8 bytes = 512 MiB
RADIUS_MARGIN = 1.25  # keeps the balancing coordinates away from the edge of solvability
ARCH_DEFAULTS = {"n_layer": 2, "n_head": 4, "n_positions": 64, "n_embd": 0}  # n_embd 0: K + 2, rounded up
DEFAULT_RANK = 48
DEFAULT_SMOOTHING = 0.05
LINKS_FILE = "links.tsv"
REPORT_FILE = "compile.json"


@dataclass
class Compiled:
    """What :func:`compile_graph` made: the folder, its model and tokenizer, and the report."""

    out: Path
    model: Any
    tokenizer: Any
    report: dict[str, Any]


def graph_vocabulary(links: list[Link], tokenizer: Any = None,
                     vocab_name: str = "the vocabulary") -> tuple[Any, dict[str, int]]:
    """The tokenizer the compiled model uses and the token -> id index for the graph.

    Without ``tokenizer``, a word tokenizer is built over the graph's own tokens the way the
    shipped model's is built from its corpus (``<bos>`` is its sentence start/end token). With
    one, every token of the graph must be in its vocabulary.

    Raises:
        InputError: a token (named with its file and line) is not a single word token, or is
            not in the given vocabulary.
    """
    if tokenizer is None:
        words = set()
        for link in links:
            for token in (link.source, link.target):
                if token != BOS and corpus_words([token]) != [token]:
                    raise InputError(f"{link.where}: {token!r} is not one word token of a word tokenizer (lowercase "
                                     "word or punctuation run); split it into links between single tokens")
                if token != BOS:
                    words.add(token)
        tokenizer = build_word_tokenizer(sorted(words))
    index = dict(tokenizer.get_vocab())
    bos = tokenizer.bos_token or BOS
    if BOS not in index and bos in index:
        index[BOS] = index[bos]  # graphs may always write <bos> for the sentence boundary
    for link in links:
        for token in (link.source, link.target):
            if token not in index:
                raise InputError(f"{link.where}: token {token!r} is not in {vocab_name}; fix the link, or compile "
                                 "without a vocabulary to build one from the graph")
    if len(tokenizer) > MAX_VOCAB:
        raise InputError(f"{vocab_name} has {len(tokenizer)} tokens; lmtune compile builds a dense V x V matrix and "
                         f"allows at most {MAX_VOCAB}")
    return tokenizer, index


def corpus_links(lines: list[str], tokenizer: Any, where: str) -> list[Link]:
    """Bigram counts of ``lines`` as links, framed ``<bos> w1 ... wn <bos>`` as training frames them."""

    bos = tokenizer.bos_token_id
    counts: dict[tuple[int, int], int] = {}
    for n, line in enumerate(lines, start=1):
        try:
            ids = [bos, *encode(tokenizer, line), bos]
        except InputError as e:
            raise InputError(f"{where} line {n}: {e}") from None
        for a, b in zip(ids[:-1], ids[1:]):
            counts[(a, b)] = counts.get((a, b), 0) + 1
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    names[bos] = BOS
    return [Link(names[a], names[b], float(c), f"{where} (bigram)") for (a, b), c in counts.items()]


def compiled_model(factors: Factors, tokenizer: Any, seed: int = 0, **arch: int) -> Any:
    """A GPT-2 whose logits for a token ``x`` at any position are ``factors.rows[x] @ factors.cols.T``.

    Args:
        factors: the rank-K factors.
        tokenizer: the model's tokenizer (its BOS is also EOS and padding, as shipped).
        seed: seeds the random weights inside the blocks (they are multiplied by zero at first).
        **arch: ``n_layer``, ``n_head``, ``n_positions``, ``n_embd`` (0: K + 2 rounded up to a
            multiple of ``n_head``).

    Raises:
        InputError: ``n_embd`` is below K + 2 or not a multiple of ``n_head``; an unknown key.
    """
    from transformers import GPT2LMHeadModel

    arch = {**ARCH_DEFAULTS, **arch}
    k, heads = factors.rank, arch["n_head"]
    if heads < 1 or arch["n_layer"] < 0 or arch["n_positions"] < 2:
        raise InputError(f"n_head={heads}, n_layer={arch['n_layer']}, n_positions={arch['n_positions']}: need "
                         "n_head >= 1, n_layer >= 0, n_positions >= 2")
    width = arch["n_embd"] or heads * math.ceil((k + 2) / heads)
    if width < k + 2 or width % heads:
        raise InputError(f"n_embd={width} must be at least rank + 2 = {k + 2} (the rank-K factors plus two "
                         f"coordinates that fix LayerNorm's mean and norm) and a multiple of n_head={heads}")
    torch.manual_seed(seed)
    config = small_gpt_config(len(tokenizer), tokenizer.bos_token_id, n_embd=width, n_layer=arch["n_layer"],
                              n_head=heads, n_positions=arch["n_positions"])
    config.tie_word_embeddings = False  # rows and columns are different factors
    model = GPT2LMHeadModel(config)
    rows, cols = factors.rows, factors.cols  # (V, K) each, float64
    sums = rows.sum(dim=1)  # (V,)
    norms2 = rows.square().sum(dim=1)  # (V,)
    radius2 = float((norms2 + sums.square() / 2).max()) * RADIUS_MARGIN + 1e-6
    spread = (2 * (radius2 - norms2) - sums.square()).sqrt()  # (V,) real by the choice of radius2
    emb = torch.zeros(len(tokenizer), width, dtype=torch.float64)  # (V, d)
    emb[:, :k] = rows
    emb[:, -2] = (-sums + spread) / 2
    emb[:, -1] = (-sums - spread) / 2
    scale = math.sqrt(radius2 / width + config.layer_norm_epsilon)  # what ln_f divides every row by
    head = torch.zeros(len(tokenizer), width, dtype=torch.float64)  # (V, d)
    head[:, :k] = cols * scale
    with torch.no_grad():
        model.transformer.wte.weight.copy_(emb)
        model.transformer.wpe.weight.zero_()  # position must not move the row off its sphere
        model.lm_head.weight.copy_(head)
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):  # residual branches add nothing
                proj.weight.zero_()
                proj.bias.zero_()
    return model


def check_out(out: Path) -> None:
    """Refuse an output path that exists and is not an empty folder: compile never overwrites."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} already exists and is not empty; choose a new folder or delete it")


def compile_graph(links: list[Link], out: str | Path, rank: int = DEFAULT_RANK, *,
                  smoothing: float = DEFAULT_SMOOTHING, tokenizer: Any = None, vocab_name: str = "the vocabulary",
                  seed: int = 0, say: Any = print, **arch: int) -> Compiled:
    """Compile ``links`` into a model folder at ``out`` (written whole or not at all).

    Args:
        links: the graph (see :mod:`lmtune.compile.graph`).
        out: the new model folder; must not exist or be empty.
        rank: K, the number of singular components kept.
        smoothing: probability mass spread evenly over each row (see :mod:`lmtune.compile.matrix`).
        tokenizer: use this vocabulary instead of building a word tokenizer from the graph.
        vocab_name: how errors name that vocabulary (e.g. its folder).
        seed: seeds the blocks' (zero-gated) random weights.
        say: where the log lines go.
        **arch: see :func:`compiled_model`.

    Returns:
        The folder, model, tokenizer and the report also written to ``compile.json``.

    Raises:
        InputError: an empty graph, unknown tokens, a bad rank, smoothing or architecture, or
            an existing non-empty ``out``.
    """
    out = Path(out)
    if not links:
        raise InputError("the graph is empty: there is nothing to compile")
    unknown = sorted(set(arch) - set(ARCH_DEFAULTS))
    if unknown:
        raise InputError(f"unknown compile key(s) {', '.join(unknown)}; valid: rank, smoothing, seed, "
                         f"{', '.join(ARCH_DEFAULTS)}")
    check_out(out)
    tokenizer, index = graph_vocabulary(links, tokenizer, vocab_name)
    vocab_size = len(tokenizer)
    matrix = graph_matrix(links, index, vocab_size, smoothing)  # (V, V)
    factors = factorise(matrix, rank)
    model = compiled_model(factors, tokenizer, seed=seed, **arch)
    report = {"matrix": "centred next-token log-probabilities", "vocab_size": vocab_size, "links": len(links),
              "smoothing": smoothing, **factors.as_dict(),
              "components": dominant_links(factors, links, index)}
    say(f"graph: {len(links)} links over {vocab_size} tokens; matrix {vocab_size} x {vocab_size}, rank {rank}")
    say(f"approximation error: ||M - M_K||_F = {factors.residual_frobenius:.6g}; "
        f"sqrt(sum of discarded s_k^2) = {factors.discarded_root:.6g}; "
        f"relative {report['relative_error']:.4f}, energy kept {report['energy_kept']:.4f}")
    for comp in report["components"]:
        tops = ", ".join(f"{s}->{t} ({c:+.2f})" for s, t, c in comp["links"])
        say(f"component {comp['component']} (s={comp['singular_value']:.3f}): {tops}")
    _publish(out, model, tokenizer, links, report)
    say(f"model saved to {out}")
    return Compiled(out=out, model=model, tokenizer=tokenizer, report=report)


def _publish(out: Path, model: Any, tokenizer: Any, links: list[Link], report: dict[str, Any]) -> None:
    """Write everything into a temporary sibling folder, then rename it to ``out``."""

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_model(model, tokenizer, tmp, extra_meta={"method": "compile", "rank": report["rank"]})
        write_links(tmp / LINKS_FILE, links)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
