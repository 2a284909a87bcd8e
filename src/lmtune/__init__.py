"""lmtune: fine-tune language models — full, partial, LoRA, QLoRA, prompt tuning, SFT, DPO, RLHF.

The Python API (each function is the code path of the CLI command of the same name)::

    import lmtune

    result = lmtune.train(data=[{"prompt": "where is the cat ?", "completion": "on the mat ."}],
                          method="lora", output_dir="runs/lora", train={"steps": 20})
    lmtune.generate(result.model, result.tokenizer, "where is the")
    lmtune.evaluate(adapter="runs/lora", data="eval.jsonl", metrics="perplexity")
    lmtune.merge(adapter="runs/lora", out="runs/merged")

Importing lmtune is cheap and changes no global state: torch and transformers load on the first
call, and every call restores the environment variables, logger levels, torch thread count and
random state it changed (``lmtune.env.run_environment``).
"""

from __future__ import annotations

import sys as _sys
import types as _types
from typing import TYPE_CHECKING, Any

from lmtune.errors import InputError, Interrupted

__version__ = "0.1.0"

__all__ = ["train", "load", "generate", "evaluate", "merge", "inspect", "compile", "load_config", "RunResult",
           "InputError", "Interrupted", "__version__"]
_API = ("train", "load", "generate", "evaluate", "merge", "inspect")  # functions of lmtune.api

if TYPE_CHECKING:
    from lmtune.api import evaluate, generate, inspect, load, merge, train
    from lmtune.config import load_config
    from lmtune.run import RunResult


def __getattr__(name: str) -> Any:
    # Resolved on first use, so ``import lmtune`` (and ``lmtune --help``) never pays for torch.
    if name in _API:
        from lmtune import api

        return getattr(api, name)
    if name == "load_config":
        from lmtune.config import load_config

        return load_config
    if name == "RunResult":
        from lmtune.run import RunResult

        return RunResult
    raise AttributeError(f"module 'lmtune' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(_types.ModuleType):
    """Keeps ``lmtune.train``, ``lmtune.generate`` and ``lmtune.evaluate`` the API functions.

    Submodules of those names exist (the loop, sampling, scoring), and importing a submodule
    binds it as an attribute of its package: without this, the first run would replace the
    function ``lmtune.train`` with the module ``lmtune.train``. ``from lmtune.train import ...``
    and ``importlib.import_module("lmtune.train")`` still reach the module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

# lmtune.compile(...) compiles a link graph into a model; the package is callable and imports
# nothing heavy until called (see lmtune/compile/__init__.py).
from lmtune import compile as compile  # noqa: E402,A004
