"""GGUF in: a ``.gguf`` file (llama.cpp's format) as a model source, read by ``transformers``.

``transformers`` reads GGUF itself (``from_pretrained(dir, gguf_file=name)``): it builds the
config from the file's metadata, the tokenizer (vocabulary, merges, special tokens and chat
template) from its ``tokenizer.*`` keys, and dequantizes the tensors (Q4_1, Q8_0, ...) to the
dtype asked for, undoing llama.cpp's q/k row permutation on the way. lmtune adds what a user
needs around that: a file that is damaged, or of an architecture ``transformers`` cannot read,
is an :class:`InputError` naming the file, and ``lmtune convert`` writes a plain
``transformers`` folder once so later runs skip the (slow, pure-Python) GGUF parse.

Reading a GGUF never unpickles anything and never downloads.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from lmtune.errors import InputError

GGUF_SUFFIX = ".gguf"


def is_gguf(path: Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; its content is checked on reading)."""
    return path.suffix.lower() == GGUF_SUFFIX


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` stands for: the file itself, or the single ``.gguf`` of a folder without config.json.

    Returns:
        The file, or ``None`` when ``path`` is not a GGUF source (a ``transformers`` folder).

    Raises:
        InputError: a folder holds several GGUF files (which one is meant is ambiguous).
    """
    if path.is_file() and is_gguf(path):
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and is_gguf(p))
    if len(files) > 1:
        raise InputError(f"{path} holds several GGUF files ({', '.join(p.name for p in files)}); "
                         "give the one you mean as model=FILE.gguf")
    return files[0] if files else None


def _reading_error(file: Path, e: Exception) -> InputError:
    """The user-facing error for a GGUF ``transformers`` could not read."""
    text = str(e)
    if "not supported" in text and "architecture" in text:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        return InputError(f"{file}: {text} This transformers reads GGUF files of these architectures: {names}. "
                          "Use a model of one of them, or its transformers (safetensors) folder.")
    return InputError(f"{file}: not a readable GGUF file ({type(e).__name__}: {text}); the file may be damaged or "
                      "truncated — download or export it again")


def _key(file: Path) -> tuple[str, int, int]:
    stat = file.stat()
    return str(file.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _config_dict(key: tuple[str, int, int]) -> dict[str, Any]:
    from transformers import AutoConfig

    file = Path(key[0])
    try:
        config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    except Exception as e:  # gguf's reader raises ValueError, struct errors, IndexError... on a bad file
        raise _reading_error(file, e) from None
    return config.to_dict()


def gguf_config(file: Path) -> dict[str, Any]:
    """The ``config.json``-style dict ``transformers`` builds from the file's metadata (cached per file).

    Raises:
        InputError: the file is damaged or of an architecture ``transformers`` does not read.
    """
    return dict(_config_dict(_key(file)))


def load_gguf_tokenizer(file: Path) -> Any:
    """The tokenizer stored in the GGUF (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    gguf_config(file)  # a clear error for a bad file before the tokenizer's own parse
    try:
        return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    except Exception as e:
        raise _reading_error(file, e) from None


def load_gguf_model(file: Path, dtype: Any) -> Any:
    """The causal LM in the GGUF, dequantized to ``dtype``.

    Raises:
        InputError: a bad file, or an architecture without a causal-LM class (an encoder).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    config = gguf_config(file)
    if config.get("model_type") in ("t5", "umt5"):
        raise InputError(f"{file} holds a {config['model_type']} encoder-decoder, not a causal language model")
    try:
        # dequantize=True: plain nn.Linear weights to train (not packed GGUF blocks, which cannot
        # train or be saved as safetensors)
        return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True,
                                                    dtype=dtype, quantization_config=GgufConfig(
                                                        gguf_file=file.name, dequantize=True))
    except Exception as e:
        raise _reading_error(file, e) from None
