"""Compiled initialisation: link graph -> weights (Eckart–Young), fine-tune, links back.

``lmtune.compile(graph, out=..., rank=K)`` compiles a graph of weighted links between tokens
into a ``transformers`` GPT-2 folder whose next-token logits are the best rank-K approximation
of the graph's centred log-probability matrix (:mod:`lmtune.compile.matrix` says why that
matrix, :mod:`lmtune.compile.build` how LayerNorm is made exact).
``lmtune.compile.extract_links(model, out=...)`` writes back the strongest links a fine-tuned model
has learned that the graph lacks. Modules: ``graph`` (link files), ``matrix`` (the matrix, SVD,
errors), ``build`` (the model folder), ``extract`` (links back), ``commands`` (files in, files out).

This package is itself callable, so ``lmtune.compile(...)`` and ``import lmtune.compile.graph``
both work: a plain function named ``compile`` on ``lmtune`` would be replaced by this package
the first time any of its modules is imported (for the same reason no function here shares a
module's name: ``extract_links``, not ``extract``). Nothing heavy (torch) is imported until called.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def compile(*args: Any, **kwargs: Any) -> Any:  # noqa: A001 - the public name the API promises
    """Compile a graph into a model folder; see :func:`lmtune.compile.commands.compile_model`."""
    from lmtune.compile.commands import compile_model

    return compile_model(*args, **kwargs)


def extract_links(*args: Any, **kwargs: Any) -> Any:
    """Extract links from a model; see :func:`lmtune.compile.commands.extract_to_files`."""
    from lmtune.compile.commands import extract_to_files

    return extract_to_files(*args, **kwargs)


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return compile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
