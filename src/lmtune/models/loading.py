"""Load local `transformers` models and tokenizers, safely, and fingerprint what they rely on.

Weights load from safetensors only: a folder holding only pickle files (``pytorch_model.bin``,
``*.pt``) is refused before anything reads it, because unpickling runs arbitrary code.
``trust_remote_code`` stays off unless the user sets it. Nothing is downloaded.

Every model lmtune saves carries ``lmtune.json`` with a fingerprint of its tokenizer
(vocabulary and special tokens). Token ids only mean the words they meant in training
under that tokenizer, so pairing a model with a different one is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtune.errors import InputError
from lmtune.models.encoders import is_encoder, read_config, refuse_encoder
from lmtune.models.gguf import find_gguf, gguf_config, is_gguf, load_gguf_model, load_gguf_tokenizer
from lmtune.models.metadata import check_model_folder, check_tokenizer_folder, read_json_object

if TYPE_CHECKING:  # torch loads when a model does, not when this module is imported
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
META_FILE = "lmtune.json"


def shipped_model_dir() -> Path:
    """The small word-level GPT that ships inside the package."""
    from importlib.resources import files

    return Path(str(files("lmtune.assets") / "model"))


def resolve_model_dir(path: str | Path | None) -> Path:
    """Check that ``path`` is a loadable model source (``None``: the shipped model) and return it.

    A source is a ``transformers`` folder or a GGUF file (given as the file, or as a folder
    holding one ``.gguf`` and no ``config.json``); for GGUF the file's path is returned, and the
    loaders below read it through ``transformers``' GGUF support.

    Raises:
        InputError: the folder is missing, has no ``config.json``, or has no safetensors
            weights (pickle-only folders are refused and never read).
    """
    folder = shipped_model_dir() if path is None else Path(path)
    if not folder.exists():
        raise InputError(f"model folder {folder} does not exist (give a local Hugging Face model folder or a "
                         ".gguf file)")
    gguf = find_gguf(folder)
    if gguf is not None:
        return gguf
    if not folder.is_dir():
        raise InputError(f"model {folder} is a file; give a .gguf file or the folder that holds config.json and "
                         "*.safetensors")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} is not a model folder: it has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InputError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); lmtune loads safetensors only, "
                "because unpickling can run arbitrary code. Convert a file you trust with "
                "`model.save_pretrained(dir, safe_serialization=True)`."
            )
        raise InputError(f"{folder} has no *.safetensors weights")
    _check_shard_index(folder)
    check_model_folder(folder)
    return folder


def _check_shard_index(folder: Path) -> None:
    """Refuse a shard index whose file names leave the folder (``../x.safetensors``, ``/abs``).

    ``transformers`` joins the names onto the folder as given, so such an index would load
    weights from anywhere on disk.
    """
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: not a readable shard index ({e})") from None
        for name in shards:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise InputError(f"{index}: shard '{name}' is not a file name inside {folder}; "
                                 "a model folder's index may only name files in that folder")


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer saved in ``folder`` (or stored in a GGUF file), locally."""
    from transformers import AutoTokenizer

    if is_gguf(Path(folder)):
        tok = load_gguf_tokenizer(Path(folder))
    else:
        check_tokenizer_folder(folder)
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:  # OSError, ValueError, or the tokenizers library's bare Exception for a damaged file
            raise InputError(f"{folder}: could not load its tokenizer: {e}") from None
    if tok.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.bos_token
    return tok


def load_causal_lm(folder: Path, trust_remote_code: bool = False, dtype: Any = None) -> Any:
    """Load a causal LM from a checked folder, safetensors only, float32 unless told otherwise.

    Raises:
        InputError: the folder holds an encoder (transformers would quietly give BERT a random
            next-token head), needs remote code, or does not load.
    """
    import torch
    from transformers import AutoModelForCausalLM

    refuse_encoder(folder)
    if is_gguf(Path(folder)):
        return load_gguf_model(Path(folder), dtype or torch.float32)
    try:
        # The loading report is asked for and checked: by default transformers only logs that a
        # tensor was missing (and initialises it at random), and a wrong shape is named only in a log.
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code,
            dtype=dtype or torch.float32, output_loading_info=True, ignore_mismatched_sizes=True,
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"{folder} needs custom code to load; set trust_remote_code=true only if you "
                             "trust the folder's author") from None
        raise InputError(f"{folder}: not a causal language model this transformers can load: {e}") from None
    except OSError as e:
        raise InputError(f"{folder}: could not load the model: {e}") from None
    refuse_incomplete(folder, info)
    return model


def refuse_incomplete(folder: Path, info: dict[str, Any]) -> None:
    """Refuse a load that left tensors at random: missing from the files, or of the wrong shape.

    A partly random model must never train or generate.

    Raises:
        InputError: naming the weight files and up to five tensors (with their shapes).
    """
    where = f"{folder}/{'model.safetensors' if (Path(folder) / 'model.safetensors').is_file() else '*.safetensors'}"
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        shown = "; ".join(f"{k} is {tuple(got)} but the config needs {tuple(want)}" for k, got, want in mismatched[:5])
        raise InputError(f"{where}: {len(mismatched)} tensor(s) do not fit config.json: {shown}. The weights "
                         "belong to another model, or config.json was edited (vocab_size and hidden sizes must "
                         "match the weights)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise InputError(f"{where} lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:5])}"
                         f"{', …' if len(missing) > 5 else ''}; they would start random. The file is incomplete or "
                         "belongs to another model")


def load_model_and_tokenizer(path: str | Path | None, tokenizer_path: str | Path | None = None,
                             trust_remote_code: bool = False) -> tuple[Any, Any, Path]:
    """Load a causal LM and its tokenizer, refusing a tokenizer the model was not trained with.

    Returns:
        ``(model, tokenizer, folder)``.
    """
    folder = resolve_model_dir(path)
    tok_folder = Path(tokenizer_path) if tokenizer_path else folder
    tokenizer = load_tokenizer(tok_folder, trust_remote_code)
    check_tokenizer(folder, tokenizer, tok_folder)
    model = load_causal_lm(folder, trust_remote_code)
    return model, tokenizer, folder


def context_length(folder: Path) -> int | None:
    """The model's maximum sequence length from its config (``None`` if it has none)."""
    config = read_config(folder)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def auto_config(folder: Path, trust_remote_code: bool = False) -> Any:
    """The model's ``transformers`` config, from ``config.json`` or a GGUF file's metadata."""
    from transformers import AutoConfig

    if is_gguf(Path(folder)):
        config = gguf_config(Path(folder))
        return AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (token → id) and the special tokens; equal ids mean equal words."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token")}
    payload = json.dumps({"vocab": vocab, "special": special}, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def weights_fingerprint(model: Any) -> str:
    """A hash of the model's parameter names and shapes (which base an adapter belongs to)."""
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def read_meta(folder: Path) -> dict[str, Any]:
    """The ``lmtune.json`` a saved model carries, or ``{}`` for a model lmtune did not write."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return {}
    return read_json_object(path, "; delete it to load the model without its record")


def check_tokenizer(model_folder: Path, tokenizer: Any, tokenizer_folder: Path | None = None) -> None:
    """Refuse a tokenizer whose fingerprint differs from the one recorded with the model."""
    recorded = read_meta(model_folder).get("tokenizer_fingerprint")
    actual = tokenizer_fingerprint(tokenizer)
    if recorded and recorded != actual:
        raise InputError(
            f"the tokenizer in {tokenizer_folder or model_folder} (fingerprint {actual}) is not the one the model in "
            f"{model_folder} was trained with ({recorded}): the token ids would no longer mean the same words. "
            "Use the tokenizer saved with the model."
        )


@contextlib.contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out``, renamed to ``out`` when the block succeeds, removed when it fails.

    So a folder a command writes (``convert``, ``export --format ollama``) is either whole or absent.
    ``out`` must not exist or be an empty folder.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: Any, tokenizer: Any, folder: Path, extra_meta: dict[str, Any] | None = None) -> None:
    """Write a plain ``transformers`` folder (safetensors + tokenizer) and lmtune's record."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), **(extra_meta or {})}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def random_twin(folder: Path, out: Path, seed: int = 0) -> Path:
    """Save the same architecture and tokenizer as ``folder`` with freshly initialised weights.

    The baseline that shows what pre-training contributes: fine-tune both on the same data
    and steps, and the difference is the knowledge the pre-trained weights carried.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(seed)
    model = (AutoModel if is_encoder(folder) else AutoModelForCausalLM).from_config(config)
    save_model(model, load_tokenizer(folder), Path(out), {"random_twin_of": str(folder)})
    return Path(out)


def param_counts(model: Any) -> tuple[int, int]:
    """(total, trainable) parameters, counting tied weights once."""
    seen = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return total, trainable


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what checkpoints and early stopping keep)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
