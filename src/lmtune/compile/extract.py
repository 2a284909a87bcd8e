"""Links back out of a model: its strongest next-token associations that a graph lacks.

The model's association ``i -> j`` is ``Q[i, j]``, its probability of ``j`` next after ``i``:

- with text (``data``), the average of the model's next-token distribution over every position
  where ``i`` is the current token, in real contexts (``<bos> w1 ... wn <bos>``, as training
  frames them). This is the bigram the model has learned, marginalised over its contexts, and
  the row of a token the text never shows is left out (no evidence);
- without text, the distribution after ``<bos> i`` (after ``<bos>`` alone for the ``<bos>``
  row): one probe per token. For a freshly compiled model both equal ``softmax(M_K)``.

Candidates are the pairs not in the graph with ``Q[i, j] >= min_prob``, strongest first; the
written weight is ``Q[i, j]`` itself (a probability, see :func:`lmtune.compile.graph.merge_links`
for how merging turns it into a weight on the graph's scale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmtune.compile.graph import Link
from lmtune.data.batching import pad_batch
from lmtune.data.examples import text_examples
from lmtune.data.readers import read_records
from lmtune.errors import InputError
from lmtune.models.loading import context_length, load_model_and_tokenizer
from lmtune.models.shipped import BOS

BATCH = 64


def token_names(tokenizer: Any) -> list[str]:
    """Each id's token as a graph names it (the BOS token as ``<bos>``)."""
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if tokenizer.bos_token_id is not None:
        names[tokenizer.bos_token_id] = BOS
    return names


@torch.no_grad()
def probe_matrix(model: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q`` ``(V, V)`` from the ``<bos> i`` probes, and which rows hold evidence ``(V,)`` (all)."""
    bos, v = tokenizer.bos_token_id, len(tokenizer)
    if bos is None:
        raise InputError("the model's tokenizer has no BOS token to start the probes with; pass text (--data)")
    model.eval()
    rows = []
    for start in range(0, v, BATCH):
        ids = torch.arange(start, min(start + BATCH, v))  # (b,)
        batch = torch.stack([torch.full_like(ids, bos), ids], dim=1)  # (b, 2): <bos> i
        rows.append(model(input_ids=batch).logits[:, 1].float().softmax(-1))  # (b, V)
    q = torch.cat(rows)  # (V, V)
    q[bos] = model(input_ids=torch.tensor([[bos]])).logits[0, 0].float().softmax(-1)
    return q, torch.ones(v, dtype=torch.bool)


@torch.no_grad()
def context_matrix(model: Any, examples: list[dict[str, list[int]]], vocab_size: int,
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q`` ``(V, V)`` averaged over the positions of ``examples``, and rows seen at least once ``(V,)``."""

    model.eval()
    sums = torch.zeros(vocab_size, vocab_size)  # (V, V)
    counts = torch.zeros(vocab_size)  # (V,)
    for start in range(0, len(examples), BATCH):
        batch = pad_batch(examples[start:start + BATCH], pad_id)
        probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().softmax(-1)
        # The last token of each example predicts nothing it was trained on; real positions only.
        keep = batch["attention_mask"].bool().clone()  # (B, T)
        keep[torch.arange(keep.shape[0]), keep.sum(1) - 1] = False
        current = batch["input_ids"][keep]  # (N,)
        sums.index_add_(0, current, probs[keep])  # (N, V) rows added to their current token's row
        counts.index_add_(0, current, torch.ones_like(current, dtype=torch.float))
    seen = counts > 0
    return sums / counts.clamp_min(1).unsqueeze(1), seen


def strongest_new_links(q: torch.Tensor, seen: torch.Tensor, names: list[str], exclude: set[tuple[str, str]],
                        top: int, min_prob: float, skip_ids: set[int]) -> list[Link]:
    """The ``top`` pairs with ``q >= min_prob`` that are not in ``exclude``, strongest first.

    Ties break by (source, target) name so the output is deterministic.
    """
    order = q.flatten().argsort(descending=True, stable=True)
    v = q.shape[0]
    found: list[Link] = []
    for flat in order.tolist():
        i, j = divmod(flat, v)
        p = float(q[i, j])
        if p < min_prob or len(found) >= top:
            break
        if not seen[i] or i in skip_ids or j in skip_ids or (names[i], names[j]) in exclude:
            continue
        found.append(Link(names[i], names[j], round(p, 6)))
    return sorted(found, key=lambda link: (-link.weight, link.source, link.target))


def new_links(model_dir: str | Path, top: int = 100, min_prob: float = 0.05,
                  exclude: set[tuple[str, str]] | None = None, data: str | Path | None = None) -> list[Link]:
    """The model's strongest next-token links that are not in ``exclude``.

    Args:
        model_dir: a model folder (compiled, fine-tuned or any causal LM lmtune loads).
        top: at most this many links.
        min_prob: only links the model gives at least this probability.
        exclude: (source, target) pairs already in the graph.
        data: text to average the model's associations over (see the module docstring);
            ``None``: one ``<bos> i`` probe per token.

    Raises:
        InputError: ``top`` below 1, ``min_prob`` outside (0, 1], an unloadable model or data.
    """

    if top < 1:
        raise InputError(f"--top {top} must be at least 1")
    if not 0 < min_prob <= 1:
        raise InputError(f"--min-prob {min_prob} must be a probability in (0, 1]")
    model, tokenizer, folder = load_model_and_tokenizer(model_dir)
    if data is None:
        q, seen = probe_matrix(model, tokenizer)
    else:
        # Truncated to the model's context: positions past it have no embedding.
        examples, _ = text_examples(read_records(data), tokenizer, max_length=context_length(folder) or 1024)
        q, seen = context_matrix(model, examples, len(tokenizer), tokenizer.pad_token_id)
    # Special tokens other than the sentence boundary are not words a graph links.
    skip = set(tokenizer.all_special_ids) - {tokenizer.bos_token_id, tokenizer.eos_token_id}
    return strongest_new_links(q, seen, token_names(tokenizer), exclude or set(), top, min_prob, skip)
