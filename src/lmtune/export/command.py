"""``lmtune export``: merge an adapter, then write GGUF (and an Ollama Modelfile)."""

from __future__ import annotations

from pathlib import Path

from lmtune.errors import InputError
from lmtune.export.gguf import DTYPES, check_exportable, write_gguf
from lmtune.export.ollama import modelfile
from lmtune.methods.adapters import merged_model
from lmtune.models.gguf import find_gguf, load_gguf_model, load_gguf_tokenizer
from lmtune.models.loading import new_folder, save_model

FORMATS = ("gguf", "ollama")


def export_command(model: str | Path | None, out: str | Path, fmt: str = "gguf", adapter: str | Path | None = None,
                   dtype: str = "f16") -> Path:
    """Write ``model`` (+ ``adapter``, merged first) as a GGUF file, or as an Ollama folder.

    ``--format gguf``: ``out`` is the ``.gguf`` file. ``--format ollama``: ``out`` is a new
    folder holding ``model.gguf`` and a ``Modelfile`` (``ollama create NAME -f out/Modelfile``).
    Everything is checked (architecture, tokenizer, template) before anything is written, and
    files are written under temporary names and renamed into place: a failure leaves nothing.

    Raises:
        InputError: an existing ``out``, an unknown format or dtype, an architecture, tokenizer
            or chat template the writer cannot express, or bad model/adapter folders.
    """

    out = Path(out)
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if out.exists():
        raise InputError(f"--out {out} already exists; choose a new path (export never overwrites)")
    if fmt == "gguf" and out.suffix.lower() != ".gguf":
        raise InputError(f"--out {out}: a GGUF file's name ends in .gguf")
    merged, tokenizer, source = merged_model(model, adapter)
    check_exportable(merged.config)
    template = getattr(tokenizer, "chat_template", None)
    if fmt == "gguf":
        write_gguf(merged, tokenizer, out, dtype, name=out.stem, chat_template=template)
        print(f"wrote {out} ({dtype}) from {source}" + (f" + {adapter}" if adapter else ""))
        return out
    text = modelfile("model.gguf", tokenizer, template)  # an untranslatable template fails before writing
    with new_folder(out) as tmp:
        write_gguf(merged, tokenizer, tmp / "model.gguf", dtype, name=out.name, chat_template=template)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    print(f"wrote {out}/model.gguf ({dtype}) and {out}/Modelfile; run: ollama create NAME -f {out}/Modelfile")
    return out


def convert_command(model: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """``lmtune convert``: a GGUF file -> a plain ``transformers`` folder (safetensors + tokenizer).

    The folder is written next to ``out`` under a temporary name and renamed into place, so a
    failure leaves nothing behind. Its ``lmtune.json`` records the GGUF it came from.

    Raises:
        InputError: ``model`` is not a GGUF source, cannot be read, or ``out`` is not empty.
    """
    import torch

    source, out = Path(model), Path(out)
    if not source.exists():
        raise InputError(f"--model {source} does not exist")
    file = find_gguf(source)
    if file is None:
        raise InputError(f"--model {source} is not a GGUF file (nor a folder holding one); convert reads .gguf files")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} already exists and is not empty; choose a new folder")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise InputError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    tokenizer = load_gguf_tokenizer(file)
    lm = load_gguf_model(file, torch_dtype)
    with new_folder(out) as tmp:
        save_model(lm, tokenizer, tmp, {"base_model": str(file), "converted_from": "gguf", "dtype": dtype})
    print(f"converted {file} ({dtype}) to {out}")
    return out
