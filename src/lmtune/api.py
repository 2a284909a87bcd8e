"""The Python API: ``lmtune.train``, ``load``, ``generate``, ``evaluate``, ``merge``, ``inspect``.

Each function is the code path of the CLI command of the same name, taking what a script has in
hand as well as what a shell has: a model folder or an in-memory ``transformers`` model with its
tokenizer, a data file or rows (a list of dicts, a ``datasets.Dataset``). Bad input raises
``lmtune.InputError`` naming the row, key or file; nothing here exits the process. Every call
runs inside ``lmtune.env.run_environment()``, so it leaves the process's settings as it found
them.

Heavy libraries load inside the functions: importing this module costs what ``lmtune.config``
costs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtune.env import run_environment
from lmtune.errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from lmtune.config import RunConfig
    from lmtune.data.readers import Record
    from lmtune.run import RunResult

PathLikeStr = str | PathLike
# What ``data=`` accepts: a file, several files (multi-task classification), or rows.
Data = PathLikeStr | Iterable[PathLikeStr] | Iterable[Mapping[str, Any]]


def train(model: PathLikeStr | nn.Module | None = None, tokenizer: Any = None, *, data: Data | None = None,
          eval_data: Data | None = None, method: str | None = None, objective: str | None = None,
          output_dir: PathLikeStr | None = None, config: RunConfig | PathLikeStr | None = None,
          overrides: list[str] | Mapping[str, Any] | None = None, show_example: bool = False,
          **sections: Any) -> RunResult:
    """Fine-tune a model: the run ``lmtune train`` makes, from Python.

    Example::

        result = lmtune.train("models/base", data="train.jsonl", method="lora", output_dir="runs/a",
                              lora={"r": 16}, train={"lr": 2e-4, "steps": 100})
        result.summary["final_loss"], result.model  # the trained model, LoRA attached

    Args:
        model: a model folder (default: ``model`` from ``config``, else the shipped model), or an
            in-memory ``transformers`` causal LM (then pass ``tokenizer``). An in-memory model is
            trained in place.
        tokenizer: the in-memory model's tokenizer (a folder carries its own).
        data: the training data: a file (JSONL/JSON/CSV/Parquet/TXT), a list of files (multi-task
            classification), or rows: a list of dicts or a ``datasets.Dataset``, fields as in a
            JSONL file (``{"prompt": ..., "completion": ...}``, ``{"text": ...}``, ...).
            Default: ``data.train`` from ``config``.
        eval_data: held-out data, in the same forms, for ``eval_loss`` and early stopping.
        method: ``full``, ``freeze``, ``lora``, ``qlora`` or ``prompt_tuning`` (default: full).
        objective: ``lm``, ``sft``, ``dpo``, ``reward``, ``ppo`` or ``classify`` (default: from
            the data's fields).
        output_dir: where the run writes its model or adapter, metrics and ``summary.json``.
        config: a ``RunConfig`` or a YAML file as the base; the other arguments override it.
        overrides: dotted keys over ``config``, as ``["train.lr=1e-4"]`` or ``{"data.format": "text"}``.
        show_example: print the first training example with its loss mask before training, as
            ``lmtune train --show-example`` (SFT; summary.json's ``example`` always holds it).
        **sections: config sections as dicts (``lora={"r": 16}``, ``train={"steps": 100}``) and
            top-level keys (``trust_remote_code=True``), applied last; ``lmtune train --keys``
            lists them all.

    Returns:
        A ``RunResult``: ``.model`` (trained, adapter attached where the method has one),
        ``.tokenizer``, ``.summary`` (the dict written to ``summary.json``), ``.output_dir``.

    Raises:
        InputError: an unknown key or bad value, a malformed row (named ``data[i]``) or file,
            an output_dir that already holds a run, or a model that does not load.
        lmtune.Interrupted: SIGINT/SIGTERM stopped the run after saving a checkpoint
            (resume with ``train={"resume": True}``).
    """
    from lmtune.config import load_config
    from lmtune.run import run_training

    keys: dict[str, Any] = {k: v for k, v in (("method", method), ("objective", objective),
                                              ("output_dir", _path_str(output_dir))) if v is not None}
    in_memory = _is_module(model)
    if in_memory:
        if tokenizer is None:
            raise InputError("an in-memory model needs its tokenizer: pass tokenizer= (e.g. the one it was "
                             "loaded with)")
    elif model is not None:
        if tokenizer is not None:
            raise InputError("tokenizer= goes with an in-memory model; a model folder is trained with the "
                             "tokenizer saved in it")
        keys["model"] = _path_str(model)
    train_files, train_records = _data(data, "data")
    eval_files, eval_records = _data(eval_data, "eval_data")
    files = {k: v for k, v in (("train", train_files), ("eval", eval_files)) if v is not None}
    if files:
        sections["data"] = {**sections.get("data", {}), **files}
    with run_environment():
        cfg = load_config(config, overrides, **keys, **sections)
        return run_training(cfg, model=model if in_memory else None, tokenizer=tokenizer,
                            train_records=train_records, eval_records=eval_records, show_example=show_example)


def load(model: PathLikeStr | None = None, adapter: PathLikeStr | None = None, *,
         trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Load a model folder and its tokenizer, with an adapter folder attached (not merged).

    Args:
        model: a local model folder (default: the shipped model).
        adapter: an adapter folder written by a lora/qlora/prompt_tuning run (its ``output_dir``).
        trust_remote_code: run code shipped inside the model folder (only for folders you trust).

    Returns:
        ``(model, tokenizer)``: the tokenizer is the adapter's when its training added tokens.

    Raises:
        InputError: a missing or pickle-only folder, an adapter for another base model.
    """
    from lmtune.methods.adapters import load_with_adapter

    with run_environment():
        lm, tokenizer, _ = load_with_adapter(_path_str(model), _path_str(adapter), trust_remote_code)
    return lm, tokenizer


def generate(model: PathLikeStr | nn.Module | None = None, tokenizer: Any = None, prompt: str | None = None, *,
             adapter: PathLikeStr | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             chat: bool = False) -> str:
    """Continue a prompt: what ``lmtune generate`` prints.

    Args:
        model: a model folder (default: the shipped model) or an in-memory causal LM.
        tokenizer: the in-memory model's tokenizer.
        prompt: the text to continue (with ``chat``: the user's message).
        adapter: an adapter folder to apply to a model folder, without merging.
        max_new_tokens: the most tokens to add.
        temperature: 0 for greedy decoding (default), else the sampling temperature.
        top_k: sample only among the k most likely tokens.
        top_p: sample only within the nucleus of cumulative probability p.
        seed: seed of the sampler's own generator (torch's global random state is untouched).
        chat: wrap the prompt in the chat template and stop at the end of the reply.

    Returns:
        The generated text only (the prompt excluded), special tokens removed.

    Raises:
        InputError: no prompt, an option out of range, a prompt longer than the model's
            context, ``chat`` without a chat template, or a model that does not load.
    """
    from lmtune.generate import generate_text
    from lmtune.methods.adapters import load_with_adapter

    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    with run_environment():
        lm, tok, _ = load_with_adapter(model if _is_module(model) else _path_str(model), _path_str(adapter),
                                       tokenizer=tokenizer)
        return generate_text(lm, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, chat=chat)


def evaluate(model: PathLikeStr | nn.Module | None = None, data: Data | None = None,
             metrics: str | list[str] = "perplexity", *, tokenizer: Any = None, adapter: PathLikeStr | None = None,
             shots: int = 0, shots_file: PathLikeStr | None = None, max_new_tokens: int = 32,
             chat: bool = True) -> dict[str, Any]:
    """Score a model on data: the numbers ``lmtune eval --json`` prints.

    Args:
        model: a model folder (default: the shipped model) or an in-memory causal LM (with
            ``tokenizer``; scored on the device it is on). Classification metrics read the head
            saved in a folder, so they take a folder.
        data: a data file or rows (a list of dicts, a ``datasets.Dataset``): text,
            prompt/completion, alpaca, chat, or text+label records.
        metrics: names, comma-separated or a list: ``perplexity``, ``exact_match``, ``token_f1``,
            ``bleu``, ``rouge``, ``accuracy``, ``f1``, ``auc``.
        tokenizer: the in-memory model's tokenizer.
        adapter: an adapter folder to apply to a model folder, without merging.
        shots: few-shot mode: this many solved examples placed before every prompt.
        shots_file: where the solved examples come from (default: ``data``).
        max_new_tokens: the generation cap for text metrics.
        chat: render prompt/completion prompts with the model's chat template when it has one
            (``False``: raw text, as ``lmtune eval --no-chat``); chat records always use it.

    Returns:
        Each metric's value, plus ``examples``, ``shots``, ``chat_template`` and, with perplexity,
        ``loss`` and ``tokens``.

    Raises:
        InputError: an unknown metric, a metric the data cannot support, malformed rows or file,
            a model that does not load.
    """
    from lmtune.evaluate import run_eval

    if data is None:
        raise InputError("evaluate needs data=: a data file, a list of dicts or a datasets.Dataset")
    files, records = _data(data, "data")
    if isinstance(files, list):
        raise InputError("evaluate scores one data file at a time; call it once per file")
    with run_environment():
        return run_eval(model if _is_module(model) else _path_str(model), _path_str(adapter),
                        records if records is not None else files, metrics, shots=shots,
                        shots_file=_path_str(shots_file), max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                        chat=chat)


def merge(model: PathLikeStr | None = None, *, adapter: PathLikeStr, out: PathLikeStr) -> Path:
    """Fold a LoRA adapter into its base and write a plain ``transformers`` folder, as ``lmtune merge``.

    Args:
        model: the base model folder the adapter was trained on (default: the shipped model).
        adapter: the adapter folder (a lora/qlora run's ``output_dir``).
        out: a new (or empty) folder for the merged model and its tokenizer.

    Returns:
        ``out``, which ``AutoModelForCausalLM.from_pretrained`` and ``lmtune.load`` read.

    Raises:
        InputError: ``out`` holds files, the adapter belongs to another base, or it is a
            prompt-tuning adapter (which changes no weight, so there is nothing to merge).
    """
    from lmtune.methods.adapters import merge_command

    with run_environment():
        return merge_command(model=_path_str(model), adapter=_path_str(adapter), out=_path_str(out))


def inspect(model: PathLikeStr | nn.Module | None = None, **keys: Any) -> dict[str, Any]:
    """Parameters and training memory of each method on a model, as ``lmtune inspect --json``.

    No weight is read: the model is built on the meta device from its config.

    Args:
        model: a model folder (default: the shipped model) or an in-memory ``transformers``
            model (its config is used).
        **keys: config keys and sections as for ``lmtune.train`` (``method="lora"``,
            ``lora={"r": 16, "target_modules": "all-linear"}``, ``quant={"block_size": 64}``).

    Returns:
        ``{"model", "architecture", "method", "methods": {name: row}, "text"}``; each row holds
        ``total_params``, ``trainable_params``, ``weight_bytes``, ``gradient_bytes``,
        ``optimizer_bytes``, ``train_bytes`` and the arithmetic behind them.

    Raises:
        InputError: a bad folder or key, or the configured method cannot apply to the model.
    """
    from lmtune.footprint import run_inspect

    with run_environment():
        return run_inspect(model if _is_module(model) else _path_str(model), **keys)


def _is_module(obj: Any) -> bool:
    # A path is answered without importing torch.
    if obj is None or isinstance(obj, (str, PathLike)):
        return False
    from torch import nn

    return isinstance(obj, nn.Module)


def _path_str(path: Any) -> str | None:
    if path is None or isinstance(path, str):
        return path
    if isinstance(path, PathLike):
        return str(Path(path))
    raise InputError(f"expected a path (str or pathlib.Path), got {type(path).__name__}")


def _data(data: Any, name: str) -> tuple[str | list[str] | None, list[Record] | None]:
    """``(file or files, None)`` for paths, ``(None, records)`` for rows, ``(None, None)`` for None."""
    from lmtune.data.readers import records_from_rows

    if data is None:
        return None, None
    if isinstance(data, (str, PathLike)):
        return str(Path(data)), None
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, PathLike)) for d in data):
        return [str(Path(d)) for d in data], None
    return None, records_from_rows(data, source=name)
