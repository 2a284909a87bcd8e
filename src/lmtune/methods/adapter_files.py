"""PEFT adapter folders: reading and writing them, and checking they belong to the model at hand.

Shared by LoRA (``lmtune.methods.adapters``) and prompt tuning (``lmtune.methods.prompt_tuning``):
``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them, lmtune's side file
with the base model's fingerprint, the tokenizer when training added tokens, and embeddings saved
whole (``modules_to_save``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtune.errors import InputError
from lmtune.methods.adapter_checks import check_adapter_config, check_finite_tensors
from lmtune.methods.lora_layer import lora_layers
from lmtune.methods.token_rows import token_rows_config_and_tensors
from lmtune.models.loading import META_FILE, load_tokenizer, read_meta, tokenizer_fingerprint
from lmtune.models.metadata import read_json_object

CONFIG_FILE = "adapter_config.json"


WEIGHTS_FILE = "adapter_model.safetensors"


PREFIX = "base_model.model."


def base_fingerprint(model: nn.Module) -> str:
    """Hash of the base weights' names and shapes, as the model was before any adapter."""
    shapes = []
    for name, param in model.named_parameters():
        if ".lora_" in name or ".weight_4bit" in name or name.endswith(".token_rows"):
            continue
        shapes.append((name.replace(".base_layer.", "."), list(param.shape)))
    for name, layer in lora_layers(model).items():
        if layer.quantized:  # its weight now lives in 4 bits; record the shape it had
            shapes.append((f"{name}.weight", list(layer.base_shape)))
    shapes.sort()
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def write_adapter_folder(out: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer: Any,
                         meta: dict[str, Any]) -> None:
    """Write a PEFT adapter folder: config, safetensors weights, tokenizer, lmtune's side file."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), **meta}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def token_embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The input embedding and the output head by module name: an adapter's ``modules_to_save`` after new tokens.

    New tokens' rows train but live in the base's matrices, so the adapter must carry the
    matrices whole (PEFT has no other way to store rows of a resized embedding).
    """
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    out = {names[id(emb)]: emb}
    if head is not None and id(head) in names:
        out[names[id(head)]] = head
    return out


def add_modules_to_save(folder: Path, modules: dict[str, nn.Module], prefix: str = PREFIX) -> None:
    """Make a saved adapter folder carry whole trained ``modules`` PEFT's way (``modules_to_save``).

    Their weights go under ``<prefix><name>.<param>`` (PEFT's prefix is ``base_model.model.`` for
    LoRA, ``base_model.`` for prompt learning). A head tied to the embedding is stored too (PEFT
    reads a key per listed module), and for LoRA ``ensure_weight_tying`` makes PEFT tie its copy
    to the embedding's (PEFT's prompt-learning configs have no such key and warn on it; their two
    copies load equal); lmtune's loader keeps the base's tie by loading both into the one tensor.
    """
    tensors = {f"{prefix}{name}.{k}": v.detach().float().cpu().clone()  # a tied head: its own copy
               for name, module in modules.items() for k, v in module.state_dict().items()}
    config = _config(folder)
    listed = config.get("modules_to_save") or []
    changes: dict[str, Any] = {"modules_to_save": list(dict.fromkeys([*listed, *modules]))}
    params = [id(p) for m in modules.values() for p in m.parameters()]
    if len(set(params)) < len(params) and config.get("peft_type") == "LORA":  # tied weights
        changes["ensure_weight_tying"] = True
    _add_to_adapter(folder, tensors, **changes)


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))


def _add_to_adapter(folder: Path, tensors: dict[str, torch.Tensor], **changes: Any) -> None:
    """Add ``tensors`` to a saved adapter's weights (if any) and ``changes`` to its config, in place."""
    from safetensors.torch import load_file, save_file

    if tensors:
        save_file({**load_file(str(folder / WEIGHTS_FILE)), **tensors}, str(folder / WEIGHTS_FILE),
                  metadata={"format": "pt"})
    config = {**_config(folder), **changes}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_heads_in_adapter(folder: Path, heads: dict[str, nn.Module]) -> None:
    """Make a saved LoRA folder a sequence-classification adapter carrying its fully trained ``heads``.

    PEFT keeps them next to the LoRA tensors as ``modules_to_save`` (weights under
    ``base_model.model.<name>.*``) and, with ``task_type`` ``SEQ_CLS``,
    ``PeftModel.from_pretrained(AutoModelForSequenceClassification...(base), folder)`` runs them.
    """
    if heads:
        add_modules_to_save(folder, heads)
    _add_to_adapter(folder, {}, task_type="SEQ_CLS")


def save_new_token_rows(folder: Path, model: nn.Module, added: list[str]) -> None:
    """Add to a saved adapter the rows of the tokens training ``added`` (and say so).

    ``model`` is the trained LoRA model, whose new rows are ``TokenRows`` (saved as PEFT's
    ``trainable_token_indices``), or a prompt-tuning wrapper, whose embeddings go whole
    (``modules_to_save``: PEFT's prompt learning has no other way). The tokenizer with the
    added tokens is already in the folder (see :func:`adapter_tokenizer`).
    """
    indices, rows = token_rows_config_and_tensors(model)
    if indices:
        _add_to_adapter(folder, rows, trainable_token_indices=indices)
    else:
        prompt = hasattr(model, "prompt_embeddings")
        add_modules_to_save(folder, token_embedding_modules(model.model if prompt else model),
                            "base_model." if prompt else PREFIX)
    meta = {**read_meta(folder), "added_tokens": added}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_adapter_folder(folder: Path | str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(adapter_config, tensors, lmtune meta)`` of an adapter folder, checked for completeness.

    Raises:
        InputError: the folder or a file is missing, a file is unreadable, weights are pickled,
            a hyper-parameter is of the wrong type or out of range, or a tensor is not finite.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"adapter folder {folder} does not exist")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        extra = (" (it holds adapter_model.bin: lmtune reads safetensors only, because unpickling can run code)"
                 if (folder / "adapter_model.bin").exists() else "")
        raise InputError(f"adapter folder {folder} is missing {' and '.join(missing)}{extra}; an adapter folder "
                         f"holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = check_adapter_config(read_json_object(folder / CONFIG_FILE), folder / CONFIG_FILE)
    try:
        tensors = load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({e})") from None
    check_finite_tensors(tensors, folder / WEIGHTS_FILE)
    return config, tensors, read_meta(folder)


def adapter_tokenizer(folder: Path | str, tokenizer: Any) -> Any:
    """The tokenizer to run an adapter with: its own when training added tokens to ``tokenizer``.

    An SFT run on chat data adds ChatML's tokens (and a chat template) to a tokenizer without a
    template; the adapter folder then holds that grown tokenizer. It is used only if it extends
    ``tokenizer`` (every base token keeps its id), so ids mean the same words.
    """
    folder = Path(folder)
    if not read_meta(folder).get("added_tokens") or not (folder / "tokenizer_config.json").is_file():
        return tokenizer
    own = load_tokenizer(folder)
    mine = own.get_vocab()
    if any(mine.get(t) != i for t, i in tokenizer.get_vocab().items()):
        raise InputError(f"the adapter in {folder} added tokens to another tokenizer than this model's; load it onto "
                         f"the model it was trained from ({read_meta(folder).get('base_model')})")
    return own


def check_base(folder: Path, meta: dict[str, Any], model: nn.Module, tokenizer: Any = None) -> None:
    """Refuse a base model (or tokenizer) other than the one the adapter was trained on."""
    recorded = meta.get("base_fingerprint")
    actual = base_fingerprint(model)
    if recorded and recorded != actual:
        raise InputError(f"the adapter in {folder} was trained on another base model (weights fingerprint "
                         f"{recorded}, base model {meta.get('base_model')}); this model's is {actual}. Load it "
                         "onto the model it was trained from.")
    tok_recorded = meta.get("tokenizer_fingerprint")
    if tokenizer is not None and tok_recorded and tok_recorded != tokenizer_fingerprint(tokenizer):
        raise InputError(f"the adapter in {folder} was trained with another tokenizer ({tok_recorded}); "
                         "its token ids would not mean the same words")


def fit_embeddings(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = PREFIX) -> None:
    """Grow ``model``'s embeddings to the rows of a saved embedding (tokens the adapter added).

    What PEFT users do with ``base.resize_token_embeddings(len(adapter_tokenizer))`` before
    loading; the new rows' values then come from the saved module. A tied head stays tied.
    """
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    saved = tensors.get(f"{prefix}{name}.weight")
    if saved is not None and saved.dim() == 2 and saved.shape[0] > emb.weight.shape[0]:
        model.resize_token_embeddings(saved.shape[0], mean_resizing=False)


def pop_saved_modules(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                       model: nn.Module, prefix: str = PREFIX) -> dict[str, dict[str, torch.Tensor]]:
    """Take PEFT's ``modules_to_save`` tensors (whole trained modules, e.g. a classifier head) out of ``tensors``.

    PEFT names a module to save by its name or a dotted suffix and stores its parameters under
    ``base_model.model.<module>.<param>``.
    """
    wanted = config.get("modules_to_save") or []
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in tensors if k.startswith(prefix) and ".lora_" not in k]:
        module, _, param = key[len(prefix):].rpartition(".")
        if any(module == w or module.endswith("." + w) for w in wanted):
            saved.setdefault(module, {})[param] = tensors.pop(key)
    modules = dict(model.named_modules())
    for module, params in saved.items():
        own = modules[module].state_dict() if module in modules else None
        if own is None or set(own) != set(params) or any(own[k].shape != v.shape for k, v in params.items()):
            raise InputError(f"{folder / WEIGHTS_FILE}: saved module {module!r} ({', '.join(sorted(params))}) does "
                             "not fit this model; the adapter belongs to another base model or head size")
    return saved
