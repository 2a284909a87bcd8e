"""Checks of the small metadata files a model folder carries, before ``transformers`` reads them.

``transformers`` and ``tokenizers`` answer a malformed ``config.json`` (a list, a size given as a
string) or ``tokenizer.json`` (an unknown model type) with a traceback from deep inside, often
an ``AttributeError`` or ``TypeError``; a ``model.safetensors`` that is really some other file
(a symlink to the wrong place) with a header error. Each is checked here first and refused with
one message naming the file and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmtune.errors import InputError

# Sizes a config.json may give; each must be a positive integer (or null, where a model allows it).
SIZE_KEYS = ("vocab_size", "hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner",
             "num_hidden_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads",
             "head_dim", "max_position_embeddings", "n_positions", "n_ctx")
TOKENIZER_MODELS = ("BPE", "WordPiece", "WordLevel", "Unigram")
TOKENIZER_OBJECT_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def read_json_object(path: Path, fix: str = "") -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        InputError: the file is unreadable, not JSON, or holds something other than an object;
            ``fix`` is appended to the message.
    """
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not readable JSON ({e}){fix}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: must hold a JSON object, but holds a {type(value).__name__}{fix}")
    return value


def check_config(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict whose sizes are positive integers.

    Raises:
        InputError: naming the file and the key.
    """
    path = Path(folder) / "config.json"
    config = read_json_object(path)
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return config


def check_tokenizer_json(folder: Path) -> None:
    """``tokenizer.json`` (when present) must be an object whose model type ``tokenizers`` knows."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return
    model = read_json_object(path).get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if kind not in TOKENIZER_MODELS:
        raise InputError(f"{path}: model type {kind!r} is not one the tokenizers library reads "
                         f"({', '.join(TOKENIZER_MODELS)}); the file is damaged or from another tool")


def check_safetensors_files(folder: Path) -> None:
    """Every ``*.safetensors`` in ``folder`` must be a readable safetensors file (its header is read, not its data)."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError (a Rust error), OSError: either way not usable weights
            link = f" (a symlink to {file.resolve()})" if file.is_symlink() else ""
            raise InputError(f"{file}{link}: not a safetensors file ({e}); point it at the model's weights") from None


def check_model_folder(folder: Path) -> None:
    """Check a model folder's ``config.json``, ``generation_config.json`` and weight files before anything loads them.

    Raises:
        InputError: naming the file and what is wrong with it.
    """
    check_config(folder)
    if (Path(folder) / "generation_config.json").is_file():
        read_json_object(Path(folder) / "generation_config.json")
    check_safetensors_files(folder)


def check_tokenizer_folder(folder: Path) -> None:
    """Check a tokenizer's JSON files (``tokenizer_config.json``, ``special_tokens_map.json``, ``tokenizer.json``).

    Raises:
        InputError: naming the file and what is wrong with it.
    """
    for name in TOKENIZER_OBJECT_FILES:
        if (Path(folder) / name).is_file():
            read_json_object(Path(folder) / name)
    check_tokenizer_json(folder)
