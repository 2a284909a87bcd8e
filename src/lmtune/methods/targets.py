"""Which modules an adapter wraps: ``lora.target_modules`` resolved against a model.

Accepted forms (the same as PEFT's, so configs move between the two):

- a list of names: each matches a module whose full name equals it or ends with ``.<name>``
  (``c_attn`` matches ``transformer.h.0.attn.c_attn``);
- a plain name (``c_attn``): the one-item list;
- any other string: a regular expression that must match a module's *full* name;
- ``all-linear``: every linear layer except the output head;
- nothing: the attention's query and value projections, found by the names the model's linear
  layers have (see :data:`ATTENTION_NAMES`): Llama-style ``q_proj``/``v_proj``, BERT-style
  ``query``/``value``, fused ``c_attn``, ``query_key_value``, ``Wqkv``, ``qkv_proj``, ... — the
  LoRA paper's choice and PEFT's default, also for architectures no table lists yet.

Unlike PEFT, every listed name must match at least one linear layer: a typo is an error that
lists the model's linear layers, not an adapter silently missing from the layers you meant.
"""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from lmtune.errors import InputError
from lmtune.methods.lora_layer import LoRALinear

LINEAR_TYPES = (nn.Linear, Conv1D)

# The default targets, by the names architectures give their attention projections: the first
# group whose names are all linear layers of the model is adapted. Query and value where they are
# separate layers (the LoRA paper's choice, and PEFT's default for the architectures it lists),
# the fused projection where one layer computes q, k and v. Names, not model types, so a new
# architecture that reuses a common naming works without an entry here.
ATTENTION_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, OPT, GPT-J, BART, StableLM, Phi, OLMo, ...
    ("query", "value"),  # BERT, RoBERTa, ELECTRA, LayoutLM
    ("query_proj", "value_proj"),  # DeBERTa-v2
    ("q_lin", "v_lin"),  # DistilBERT
    ("q", "v"),  # T5, mT5
    ("c_attn",),  # GPT-2, GPT-BigCode (fused q, k, v)
    ("query_key_value",),  # GPT-NeoX, Falcon, BLOOM
    ("qkv_proj",),  # Phi-3, CodeGen
    ("Wqkv",),  # MPT
    ("in_proj",),  # DeBERTa (v1)
    ("key", "value", "receptance", "output"),  # RWKV: no attention; its time-mixing projections
)
SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]+")


def is_linear(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module`` (``nn.Linear`` or GPT-2's transposed ``Conv1D``)."""
    return isinstance(module, LINEAR_TYPES)


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``named_modules()`` as the base model had them: a LoRA layer stands for the layer it wraps."""
    out: dict[str, nn.Module] = {}
    inside: str | None = None
    for name, m in model.named_modules():  # pre-order: a wrapper's insides follow it directly
        if inside is not None and name.startswith(inside + "."):
            continue
        inside = None
        if isinstance(m, LoRALinear):
            out[name], inside = m.base_layer, name
        else:
            out[name] = m
    return out


def linear_names(model: nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers, in model order (for error messages)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in base_modules(model).items() if is_linear(m)))


def head_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that produce the model's outputs: the LM head, a classifier's ``score``/``classifier``.

    ``all-linear`` leaves them out (as PEFT does, with PEFT's names for a classification head),
    and so does QLoRA's NF4: a classification head trains in full instead.
    """
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [out] if out is not None else []
    heads += [m for m in (getattr(model, n, None) for n in SEQ_CLS_HEADS) if isinstance(m, nn.Module)]
    return [getattr(h, "base_layer", h) for h in heads]


def _head_names(model: nn.Module) -> set[str]:
    heads = {id(h) for h in head_layers(model)}
    return {name for name, m in base_modules(model).items() if id(m) in heads}


def _not_found(what: str, model: nn.Module) -> InputError:
    return InputError(f"lora.target_modules: {what} matches no linear layer of {type(model).__name__}; "
                      f"linear modules in this model: {', '.join(linear_names(model))}")


def default_targets(model: nn.Module) -> list[str]:
    """The short names LoRA adapts when ``lora.target_modules`` is unset (see :data:`ATTENTION_NAMES`).

    Raises:
        InputError: no group of names is all present among the model's linear layers (the error
            lists them, so the user can pick).
    """
    heads = _head_names(model)
    present = {n.rsplit(".", 1)[-1] for n, m in base_modules(model).items() if is_linear(m) and n not in heads}
    for group in ATTENTION_NAMES:
        if present.issuperset(group):
            return list(group)
    raise InputError(f"lora.target_modules is not set and {type(model).__name__} has no linear layer named like an "
                     f"attention projection ({', '.join('/'.join(g) for g in ATTENTION_NAMES[:6])}, ...); set it, "
                     f"e.g. lora.target_modules=all-linear or a list of names. Linear modules in this model: "
                     f"{', '.join(linear_names(model))}")


def resolve_targets(model: nn.Module, targets: str | list[str] | None, dora: bool = False) -> list[str]:
    """Full names of the modules that ``targets`` selects, in model order.

    Args:
        model: the (unwrapped) model.
        targets: see the module docstring.
        dora: named in the error when a target is a layer DoRA cannot decompose.

    Returns:
        Module names such as ``transformer.h.0.attn.c_attn``.

    Raises:
        InputError: a name or pattern matching no linear layer (the error lists the model's
            linear layers), a name matching a non-linear module, or (``targets`` unset) a model
            whose linear layers have none of the attention names.
    """
    modules = base_modules(model)
    if targets is None:  # only linear layers: a non-linear module may share a short name (e.g. ``value``)
        group, heads = set(default_targets(model)), _head_names(model)
        return [n for n, m in modules.items() if is_linear(m) and n not in heads and n.rsplit(".", 1)[-1] in group]
    if isinstance(targets, str) and targets == "all-linear":
        heads = _head_names(model)
        found = [n for n, m in modules.items() if is_linear(m) and n not in heads]
        if not found:
            raise InputError(f"lora.target_modules=all-linear: {type(model).__name__} has no linear layer "
                             "besides the output head")
        return found
    if isinstance(targets, str) and not _PLAIN_NAME.fullmatch(targets):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise InputError(f"lora.target_modules: {targets!r} is neither a module name nor a valid regular "
                             f"expression ({e})") from None
        found = [n for n, m in modules.items() if is_linear(m) and pattern.fullmatch(n)]
        if not found:
            raise _not_found(f"the pattern {targets!r}", model)
        return found
    names = [targets] if isinstance(targets, str) else list(targets)
    chosen: set[str] = set()
    for entry in names:
        if not isinstance(entry, str) or not entry:
            raise InputError(f"lora.target_modules: {entry!r} is not a module name")
        hits = [n for n in modules if n and (n == entry or n.endswith("." + entry))]
        if not hits:
            raise _not_found(repr(entry), model)
        wrong = [n for n in hits if not is_linear(modules[n])]
        if wrong:
            kind = type(modules[wrong[0]]).__name__
            method = "DoRA decomposes a weight matrix per output and" if dora else "LoRA"
            raise InputError(f"lora.target_modules: {entry!r} names {kind} modules ({wrong[0]}); {method} "
                             f"adapts only linear layers (nn.Linear, Conv1D). Linear modules in this model: "
                             f"{', '.join(linear_names(model))}")
        chosen.update(hits)
    return [n for n in modules if n in chosen]
