"""Train only the rows of added tokens: PEFT's ``trainable_token_indices``, next to a LoRA adapter.

When chat data makes lmtune add ChatML's tokens to a tokenizer without a template, their
embedding rows (and output-head rows) start random and must learn. Training the whole matrices
would make them most of an adapter's trainable parameters and optimizer state (63% of a real
base model's parameters); instead the input embedding and the output head are wrapped so that
the rows of the new ids come from one small trainable ``(N, H)`` tensor and every other row from
the frozen base matrix::

    ids ─► embedding ─► row i = token_rows[k] if i == ids[k] else W[i]        (W frozen)
    hidden ─► head   ─► logit i = token_rows[k]·h if i == ids[k] else W[i]·h

A head tied to the embedding shares the same ``token_rows``. Saved as PEFT saves it:
``adapter_config.json`` ``trainable_token_indices`` ``{module name: ids}`` and tensors
``base_model.model.<module>.token_adapter.trainable_tokens_delta`` holding the rows' *values*
(PEFT's name; it copies them over the base rows). PEFT loads that onto the base resized to the
adapter's tokenizer; a tied head is tied again by PEFT itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtune.errors import InputError

ROWS_KEY = "token_adapter.trainable_tokens_delta"


class TokenRows(nn.Module):
    """An ``nn.Embedding`` or output ``nn.Linear`` whose rows ``ids`` are the trainable ``token_rows``.

    Args:
        base_layer: the frozen embedding or head.
        ids: the token ids whose rows train.
        shared: another ``TokenRows`` whose rows to use (a head tied to the embedding).
    """

    def __init__(self, base_layer: nn.Module, ids: list[int], shared: TokenRows | None = None):
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise InputError(f"new-token rows: {type(base_layer).__name__} is neither an embedding nor a linear head")
        self.base_layer = base_layer
        order = sorted(set(ids))
        self.register_buffer("token_ids", torch.tensor(order, device=base_layer.weight.device), persistent=False)
        if shared is not None:
            self.token_rows = shared.token_rows  # one parameter, two modules
        else:
            start = base_layer.weight.detach()[self.token_ids].float().clone()  # (N, H)
            self.token_rows = nn.Parameter(start, requires_grad=True)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base matrix (its rows for ``token_ids`` are stale; see :meth:`merged_weight`)."""
        return self.base_layer.weight

    def merged_weight(self) -> torch.Tensor:
        """(V, H) the base matrix with the trained rows in place."""
        w = self.base_layer.weight
        return w.index_copy(0, self.token_ids, self.token_rows.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        out = base(x)
        rows = self.token_rows.to(out.dtype)
        if isinstance(base, nn.Embedding):  # x: (...,) ids -> (..., H)
            slot = torch.searchsorted(self.token_ids, x).clamp(max=len(self.token_ids) - 1)  # (...,)
            new = F.embedding(slot, rows)  # (..., H)
            scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings
            if scale is not None:
                new = new * scale.to(new.dtype)
            return torch.where((self.token_ids[slot] == x).unsqueeze(-1), new, out)
        bias = base.bias[self.token_ids] if base.bias is not None else None
        new = F.linear(x, rows, bias)  # (..., N): the new tokens' logits
        return out.index_copy(-1, self.token_ids, new)  # (..., V)


def token_row_layers(model: nn.Module) -> dict[str, TokenRows]:
    """Every ``TokenRows`` wrapper by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TokenRows)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def embedding_names(model: nn.Module) -> tuple[str, str | None, bool]:
    """``(input embedding name, output head name or None, tied)``."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_name = names.get(id(head)) if head is not None else None
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    return names[id(emb)], head_name, tied


def wrap_token_rows(model: nn.Module, ids: list[int]) -> list[nn.Parameter]:
    """Make only the rows ``ids`` of the input embedding and output head trainable; returns their tensors.

    The base matrices stay frozen (no gradient, no optimizer state); an untied head gets its own
    rows, a tied one shares the embedding's.
    """
    emb_name, head_name, tied = embedding_names(model)
    emb = TokenRows(model.get_submodule(emb_name), ids)
    _replace(model, emb_name, emb)
    params = [emb.token_rows]
    if head_name is not None:
        head_base = model.get_submodule(head_name)
        head = TokenRows(head_base, ids, shared=emb if tied else None)
        _replace(model, head_name, head)
        if not tied:
            params.append(head.token_rows)
    return params


def token_rows_config_and_tensors(model: nn.Module) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """``trainable_token_indices`` and the PEFT tensors of the wrapped rows (a tied head: not stored twice)."""
    config, tensors, seen = {}, {}, set()
    for name, layer in token_row_layers(model).items():
        if id(layer.token_rows) in seen:
            continue  # tied: PEFT ties the head's rows to the embedding's itself
        seen.add(id(layer.token_rows))
        config[name] = layer.token_ids.tolist()
        tensors[f"base_model.model.{name}.{ROWS_KEY}"] = layer.token_rows.detach().float().cpu().contiguous()
    return config, tensors


def load_token_rows(model: nn.Module, indices: Any, tensors: dict[str, torch.Tensor], where: str,
                    trainable: bool = False) -> None:
    """Wrap ``model``'s embedding and head with saved rows (PEFT's ``trainable_token_indices``); pops the tensors.

    Raises:
        InputError: indices or tensors that do not fit this model (another base or vocabulary).
    """
    emb_name, head_name, tied = embedding_names(model)
    if isinstance(indices, list):  # PEFT's short form: the input embedding
        indices = {emb_name: indices}
    if not isinstance(indices, dict):
        raise InputError(f"{where}: trainable_token_indices must be a list of ids or {{module: ids}}")
    wrapped: dict[str, TokenRows] = {}
    for key, ids in indices.items():
        name = next((n for n in (emb_name, head_name) if n and (n == key or n.endswith("." + key))), None)
        rows = tensors.pop(f"base_model.model.{name}.{ROWS_KEY}", None) if name else None
        vocab = model.get_submodule(name).weight.shape[0] if name else 0
        if (rows is None or not isinstance(ids, list) or rows.shape[0] != len(ids) or len(set(ids)) != len(ids)
                or not all(isinstance(i, int) and 0 <= i < vocab for i in ids)):
            raise InputError(f"{where}: trainable_token_indices[{key!r}] does not fit this model's embeddings "
                             f"({emb_name}, {head_name}); the adapter belongs to another base model or vocabulary")
        layer = TokenRows(model.get_submodule(name), ids)
        if rows.shape[1] != layer.token_rows.shape[1]:
            raise InputError(f"{where}: {name} rows are {rows.shape[1]} wide; this model's are "
                             f"{layer.token_rows.shape[1]}")
        with torch.no_grad():
            layer.token_rows.copy_(rows[torch.tensor(ids).argsort()])  # TokenRows keeps its ids sorted
        layer.token_rows.requires_grad_(trainable)
        _replace(model, name, layer)
        wrapped[name] = layer
    if tied and head_name and emb_name in wrapped and head_name not in wrapped:
        _replace(model, head_name, TokenRows(model.get_submodule(head_name), wrapped[emb_name].token_ids.tolist(),
                                             shared=wrapped[emb_name]))


def merge_token_rows(model: nn.Module) -> None:
    """Write the trained rows into the base matrices and unwrap (a tied head stays tied)."""
    for name, layer in token_row_layers(model).items():
        with torch.no_grad():
            layer.base_layer.weight.index_copy_(0, layer.token_ids, layer.token_rows.to(layer.base_layer.weight.dtype))
        _replace(model, name, layer.base_layer)


def new_rows_vocab(indices: Any) -> int:
    """The vocabulary size the saved rows need: one past the largest id."""
    ids = indices if isinstance(indices, list) else [i for v in (indices or {}).values() for i in v]
    return max((i for i in ids if isinstance(i, int)), default=-1) + 1
