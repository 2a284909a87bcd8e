"""Adapters on a model: inject, save and load in PEFT's layout, merge, switch, disable.

An adapter folder is what ``peft.PeftModel.from_pretrained(base, folder)`` reads:

- ``adapter_config.json``: ``peft_type``, ``r``, ``lora_alpha``, ``target_modules`` (the full
  names of the adapted layers, so PEFT adapts exactly these), ``fan_in_fan_out``, ...;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, d_in),
  ``...lora_B.weight`` (d_out, r), and DoRA's ``...lora_magnitude_vector`` (d_out,);

plus the tokenizer and lmtune's side file ``lmtune.json`` (PEFT ignores it) recording which base
the adapter belongs to: a fingerprint of the base weights' names and shapes and of the tokenizer.
Loading onto another base is then a sentence, not a shape-mismatch traceback.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmtune.data.templates import adopt_saved_template
from lmtune.errors import InputError
from lmtune.methods.adapter_files import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    adapter_tokenizer,
    base_fingerprint,
    check_base,
    fit_embeddings,
    pop_saved_modules,
    read_adapter_folder,
    write_adapter_folder,
)
from lmtune.methods.lora_layer import DEFAULT, LoRALinear, LoRASpec, lora_layers
from lmtune.methods.prompt_tuning import load_prompt_adapter
from lmtune.methods.targets import base_modules, is_linear
from lmtune.methods.token_rows import load_token_rows, merge_token_rows, new_rows_vocab
from lmtune.models.loading import load_model_and_tokenizer, save_model, weights_fingerprint

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
# PEFT options whose non-default values change the computation in ways lmtune does not reproduce.
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "alpha_pattern": {},
                "use_qalora": False, "layer_replication": None,
                "target_parameters": None, "use_bdlora": None}


def inject(model: nn.Module, names: list[str], spec: LoRASpec | dict[str, LoRASpec], adapter: str = DEFAULT,
           quantize: dict[str, Any] | None = None, quantize_only: set[str] | None = None) -> dict[str, LoRALinear]:
    """Wrap the modules ``names`` in LoRA layers (once) and add adapter ``adapter`` to each.

    Args:
        model: the model, changed in place.
        names: full module names (from :func:`resolve_targets`).
        spec: the adapter's hyper-parameters, or one per module name.
        adapter: the adapter's name.
        quantize: ``{"block_size", "double_quant"}`` to store newly wrapped base weights in NF4.
        quantize_only: with ``quantize``, the names that can be quantized (others stay as they are).

    Returns:
        The LoRA layers by module name.
    """
    modules = dict(model.named_modules())
    layers = {}
    for name in names:
        layer = modules[name]
        if not isinstance(layer, LoRALinear):
            q = quantize is not None and (quantize_only is None or name in quantize_only)
            layer = LoRALinear(layer, quantize_base=q, **(quantize or {}))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        try:
            layer.add_adapter(adapter, spec[name] if isinstance(spec, dict) else spec)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None
        layers[name] = layer
    return layers


def adapter_parameters(model: nn.Module, adapter: str = DEFAULT) -> list[nn.Parameter]:
    """The trainable tensors of adapter ``adapter`` (what the optimizer should see)."""
    layers = [layer for layer in lora_layers(model).values() if adapter in layer.lora_A]
    return [p for layer in layers for p in layer.adapter_params(adapter)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters loaded into ``model``."""
    return list(dict.fromkeys(n for layer in lora_layers(model).values() for n in layer.lora_A))


def set_active_adapter(model: nn.Module, adapter: str) -> None:
    """Make ``adapter`` the one that runs (layers without it run their base weights)."""
    if adapter not in adapter_names(model):
        raise InputError(f"no adapter named {adapter!r}; loaded: {', '.join(adapter_names(model)) or 'none'}")
    for layer in lora_layers(model).values():
        if layer.merged and adapter not in layer.merged:
            raise InputError(f"adapter {', '.join(layer.merged)} is merged into the weights; unmerge it first")
        layer.active = adapter if adapter in layer.lora_A else None


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block (the reference model for DPO and PPO).

    Works for LoRA, DoRA and QLoRA layers (merged ones are taken out and put back) and for
    prompt-tuning wrappers (the soft prompt is skipped).

    Raises:
        ValueError: ``model`` carries no adapter, so there is no base model to return to.
    """
    if hasattr(model, "prompt_embeddings"):
        was, model.prompt_enabled = model.prompt_enabled, False
        try:
            yield model
        finally:
            model.prompt_enabled = was
        return
    layers = lora_layers(model)
    if not any(layer.lora_A for layer in layers.values()):
        raise ValueError("disable_adapter: the model carries no adapter, so it has no separate base model")
    state = {name: (layer.active, list(layer.merged)) for name, layer in layers.items()}
    for layer in layers.values():
        for merged in list(layer.merged):
            layer.unmerge(merged)
        layer.active = None
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.active, merged = state[name]
            for adapter in merged:
                layer.merge(adapter)


def merge_adapter(model: nn.Module, adapter: str | None = None) -> None:
    """Fold the active (or named) adapter into the base weights; :func:`unmerge_adapter` undoes it."""
    for layer in lora_layers(model).values():
        name = adapter or layer.active
        if name is not None and name in layer.lora_A:
            layer.merge(name)


def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for layer in lora_layers(model).values():
        for name in list(layer.merged):
            layer.unmerge(name)


def unload(model: nn.Module) -> nn.Module:
    """Replace each LoRA layer by its base layer (after :func:`merge_adapter`: a plain model).

    Trained rows of added tokens are written into the embedding and head as they unwrap.
    """
    for name, layer in lora_layers(model).items():
        if layer.quantized:
            raise InputError("this model's base is 4-bit; load the adapter onto the full-precision base to merge")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    merge_token_rows(model)
    return model


def merge_and_unload(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """The plain ``transformers`` model with the adapter folded in (runs at base-model speed)."""
    merge_adapter(model, adapter)
    return unload(model)


# ---- files -----------------------------------------------------------------------------------

def _peft_config(model: nn.Module, adapter: str, base_folder: Path | str | None) -> dict[str, Any]:
    layers = {n: layer for n, layer in lora_layers(model).items() if adapter in layer.lora_A}
    specs = [layer.specs[adapter] for layer in layers.values()]
    r = max(set(s.r for s in specs), key=[s.r for s in specs].count)
    spec = specs[0]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": list(layers),
        "rank_pattern": {n: layer.specs[adapter].r for n, layer in layers.items() if layer.specs[adapter].r != r},
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "use_rslora": spec.rslora, "use_dora": spec.dora, "bias": "none",
        "init_lora_weights": "gaussian" if spec.init == "gaussian" else True,
        "base_model_name_or_path": str(base_folder) if base_folder is not None else None,
        "inference_mode": True, "modules_to_save": None,
    }


def lora_state_dict(model: nn.Module, adapter: str = DEFAULT) -> dict[str, torch.Tensor]:
    """Adapter ``adapter``'s tensors under PEFT's key names."""
    out = {}
    for name, layer in lora_layers(model).items():
        if adapter not in layer.lora_A:
            continue
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter].weight
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter].weight
        if adapter in layer.lora_magnitude_vector:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter]
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_adapter(model: nn.Module, out: Path, tokenizer: Any = None, adapter: str = DEFAULT,
                 base_folder: Path | str | None = None, meta: dict[str, Any] | None = None) -> None:
    """Save adapter ``adapter`` of ``model`` as a PEFT LoRA folder."""
    if adapter not in adapter_names(model):
        raise InputError(f"no adapter named {adapter!r} to save")
    meta = {"adapter": "lora", "base_fingerprint": base_fingerprint(model),
            "base_model": str(base_folder) if base_folder is not None else None, **(meta or {})}
    write_adapter_folder(Path(out), _peft_config(model, adapter, base_folder), lora_state_dict(model, adapter),
                         tokenizer, meta)


def _lora_tensors(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Group PEFT keys by module, checking every key, module and shape against the model."""
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, [], False, "none"):
            raise InputError(f"{folder / CONFIG_FILE}: PEFT option {key}={config[key]!r} is not supported by lmtune")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise InputError(f"{folder / WEIGHTS_FILE}: unexpected tensor {key!r}; lmtune reads LoRA's lora_A, "
                             "lora_B and lora_magnitude_vector")
        grouped.setdefault(m["module"], {})[m["part"].split(".")[0]] = value
    if not grouped:
        raise InputError(f"{folder / WEIGHTS_FILE} holds no LoRA tensors")
    for module, parts in grouped.items():
        layer = modules.get(module)
        if layer is None or not is_linear(layer):
            raise InputError(f"the adapter in {folder} adapts {module!r}, which this model does not have as a "
                             "linear layer: the adapter belongs to another base model")
        if "lora_A" not in parts or "lora_B" not in parts:
            raise InputError(f"{folder / WEIGHTS_FILE}: {module} has only {', '.join(parts)}; it needs lora_A "
                             "and lora_B")
        if ("lora_magnitude_vector" in parts) != bool(config.get("use_dora")):
            raise InputError(f"{folder / WEIGHTS_FILE}: {module}: use_dora={config.get('use_dora')} in the config "
                             "but the DoRA magnitude vector is " + ("present" if "lora_magnitude_vector" in parts
                                                                    else "missing"))
        d_in, d_out = (layer.nx, layer.nf) if isinstance(layer, Conv1D) else (layer.in_features, layer.out_features)
        r = parts["lora_A"].shape[0] if parts["lora_A"].dim() == 2 else -1
        expected = {"lora_A": (r, d_in), "lora_B": (d_out, r), "lora_magnitude_vector": (d_out,)}
        for part, value in parts.items():
            if r <= 0 or tuple(value.shape) != expected[part]:
                key = f"{PREFIX}{module}.{part}" + (".weight" if part != "lora_magnitude_vector" else "")
                raise InputError(f"{folder / WEIGHTS_FILE}: {key} has shape {tuple(value.shape)}; "
                                 f"this model's {module} ({d_out} × {d_in}) needs {expected[part]}")
    return grouped


def load_adapter(model: nn.Module, folder: Path | str, tokenizer: Any = None, adapter: str = DEFAULT,
                 trainable: bool = False) -> nn.Module:
    """Load a PEFT adapter folder (LoRA, DoRA or prompt tuning) onto ``model`` without merging.

    LoRA adapters go into ``model`` in place, as adapter ``adapter``, and become active (several
    can be loaded under different names; see :func:`set_active_adapter`). A prompt-tuning adapter
    returns a wrapper around ``model``.

    Returns:
        The model to run.

    Raises:
        InputError: missing files, another base model (fingerprint, module names or shapes),
            another tokenizer, or PEFT options lmtune does not implement.
    """
    folder = Path(folder)
    config, tensors, meta = read_adapter_folder(folder)
    peft_type = config.get("peft_type")
    if config.get("modules_to_save"):  # an embedding saved whole may have rows for added tokens
        fit_embeddings(model, tensors, "base_model." if peft_type == "PROMPT_TUNING" else PREFIX)
    if peft_type == "PROMPT_TUNING":
        return load_prompt_adapter(model, folder, config, tensors, meta, tokenizer)
    if peft_type != "LORA":
        raise InputError(f"{folder / CONFIG_FILE}: peft_type {peft_type!r} is not one lmtune loads (LORA, "
                         "PROMPT_TUNING)")
    indices = config.get("trainable_token_indices")
    if indices:  # rows of tokens the adapter added: the base grows to the adapter's vocabulary first
        vocab = max(new_rows_vocab(indices), len(tokenizer) if tokenizer is not None else 0)
        if vocab > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab, mean_resizing=False)
    check_base(folder, meta, model, tokenizer)
    saved = pop_saved_modules(folder, config, tensors, model)
    if indices:
        load_token_rows(model, indices, tensors, str(folder / WEIGHTS_FILE), trainable)
    modules = base_modules(model)
    grouped = _lora_tensors(folder, config, tensors, modules)
    alpha = float(config.get("lora_alpha", 8))
    specs = {module: LoRASpec(r=parts["lora_A"].shape[0], alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                              rslora=bool(config.get("use_rslora")), dora=bool(config.get("use_dora")))
             for module, parts in grouped.items()}
    model.requires_grad_(False)
    layers = inject(model, list(grouped), specs, adapter)
    with torch.no_grad():
        for module, parts in grouped.items():
            layer = layers[module]
            layer.lora_A[adapter].weight.copy_(parts["lora_A"])
            layer.lora_B[adapter].weight.copy_(parts["lora_B"])
            if "lora_magnitude_vector" in parts:
                layer.lora_magnitude_vector[adapter].copy_(parts["lora_magnitude_vector"])
        for module, params in saved.items():  # e.g. a classifier head: replaced whole, not adapted
            model.get_submodule(module).load_state_dict(params)
    for p in adapter_parameters(model, adapter):
        p.requires_grad_(trainable)
    set_active_adapter(model, adapter)
    return model


def load_with_adapter(model: str | Path | nn.Module | None, adapter: str | Path | None = None,
                      trust_remote_code: bool = False, tokenizer: Any = None) -> tuple[nn.Module, Any, Path | None]:
    """The model and tokenizer to run: a model folder's, with an adapter folder loaded onto it
    (not merged), or the caller's in-memory model and tokenizer as they are.

    The tokenizer is the adapter's own when its training added tokens (chat data); see
    :func:`adapter_tokenizer`. It gets the chat template the adapter was trained with when the
    base has none, so evaluation, generation, merge and export use the rendering it learned.

    Returns:
        ``(model, tokenizer, model folder)``; the folder is ``None`` for an in-memory model.

    Raises:
        InputError: an in-memory model without its tokenizer or with an adapter folder (which
            would be injected into the caller's model), a tokenizer given with a folder, or as
            ``load_model_and_tokenizer`` and :func:`load_adapter`.
    """
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise InputError("an in-memory model needs its tokenizer: pass tokenizer=")
        if adapter:
            raise InputError("adapter= loads an adapter folder onto a model folder; for an in-memory model, load "
                             "both with lmtune.load(model_folder, adapter=...) or pass the adapted model")
        return model, tokenizer, None
    if tokenizer is not None:
        raise InputError("tokenizer= goes with an in-memory model; a model folder comes with its own tokenizer")
    lm, tokenizer, folder = load_model_and_tokenizer(model, trust_remote_code=trust_remote_code)
    if adapter:
        tokenizer = adapter_tokenizer(adapter, tokenizer)
        adopt_saved_template(tokenizer, adapter)  # trained with data.chat_template=NAME|FILE on a template-less base
        lm = load_adapter(lm, adapter, tokenizer=tokenizer)
    return lm, tokenizer, folder


def merged_model(model: str | Path | None, adapter: str | Path | None) -> tuple[nn.Module, Any, Path]:
    """Load a base model (folder or GGUF) and fold ``adapter`` (if any) into it.

    A QLoRA adapter merges into the *original* full-precision base, never into 4-bit weights
    (rounding the merged weights to NF4 again would lose most of the update).

    Returns:
        ``(plain transformers model, tokenizer to run it with, base source)``.

    Raises:
        InputError: bad folders, an adapter for another base, or a prompt-tuning adapter (nothing
            to fold: it adds inputs, not weight changes).
    """
    if adapter is not None:
        config, _, _ = read_adapter_folder(adapter)
        if config.get("peft_type") == "PROMPT_TUNING":
            raise InputError(f"{adapter} is a prompt-tuning adapter: it prepends learned inputs and changes no "
                             "weight, so there is nothing to merge; use it with --adapter instead")
    # The adapter's tokenizer where its training added chat tokens: the merged rows are for those ids.
    base, tokenizer, folder = load_with_adapter(model, adapter)
    return (merge_and_unload(base) if adapter is not None else base), tokenizer, folder


def merge_command(model: str | Path | None, adapter: str | Path, out: str | Path) -> Path:
    """``lmtune merge``: base + adapter -> a plain ``transformers`` folder with the tokenizer; returns ``out``.

    Raises:
        InputError: see :func:`merged_model`, or an ``out`` that already holds a model.
    """

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} already exists and is not empty; choose a new folder")
    merged, tokenizer, folder = merged_model(model, adapter)
    save_model(merged, tokenizer, out, {"base_model": str(folder), "adapter": str(adapter), "method": "merged",
                                        "weights_fingerprint": weights_fingerprint(merged)})
    return out
