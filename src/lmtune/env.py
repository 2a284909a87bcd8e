"""The process settings a run wants, applied where a run starts and undone where it ends.

Importing lmtune changes nothing. A run wants a few things of the libraries it drives:
nothing downloaded (every load is local), no weight-loading progress bars or library chatter
burying lmtune's own log, no tokenizers fork warnings. The command line owns its process and
sets these once (``set_process_defaults``); the Python API runs each call inside
``run_environment()``, which restores exactly what it changed, so a notebook that calls
``lmtune.train`` and then ``AutoModel.from_pretrained("gpt2")`` is still online and as verbose
as before.

Defaults only: a variable the user has set, or a logger level the user has chosen, is left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}
# torchao notes CUDA kernels it cannot load on a CPU machine; pytree warns about registrations.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def set_process_defaults() -> None:
    """For the ``lmtune`` command, which owns its process: set the defaults, never undo them.

    Cheap (no imports): called before transformers loads, so its import reads these variables.
    """
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


@contextmanager
def run_environment() -> Iterator[None]:
    """Apply the run's settings for the duration of a ``with`` block, then restore them.

    Sets, where the user has not: the variables in ``ENV_DEFAULTS``; huggingface_hub's offline
    flag and transformers' progress bar and verbosity (these libraries read their variables once,
    at import, so the variables alone would not reach them); the loggers in ``QUIET_LOGGERS``.
    Also restores torch's intra-op thread count and its CPU random state (and CUDA's where CUDA
    was already initialised), which training and the demo change.
    """
    # Imported before any variable is set, so that their import-time reads see the user's
    # environment; the run's settings are then applied to their runtime flags below.
    import importlib

    import huggingface_hub.constants as hub
    import torch
    from transformers.utils import logging as hf_logging

    # The module, not the tqdm class that huggingface_hub.utils exports under the same name.
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")

    user = dict(os.environ)
    with ExitStack() as undo:
        for name, value in ENV_DEFAULTS.items():
            if name not in user:
                os.environ[name] = value
                undo.callback(os.environ.pop, name, None)
        if "HF_HUB_OFFLINE" not in user and "TRANSFORMERS_OFFLINE" not in user:
            undo.callback(setattr, hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)
            hub.HF_HUB_OFFLINE = True
        if "HF_HUB_DISABLE_PROGRESS_BARS" not in user and hf_logging.is_progress_bar_enabled():
            # enable_progress_bar() resets huggingface_hub's per-group switches: put them back after it.
            undo.callback(_restore, hub_tqdm.progress_bar_states, dict(hub_tqdm.progress_bar_states))
            undo.callback(hf_logging.enable_progress_bar)
            hf_logging.disable_progress_bar()
        quiet = [] if "TRANSFORMERS_VERBOSITY" in user else ["transformers"]
        for name in quiet + [n for n in QUIET_LOGGERS if logging.getLogger(n).level == logging.NOTSET]:
            logger = logging.getLogger(name)
            undo.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        undo.callback(torch.set_num_threads, torch.get_num_threads())
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        undo.enter_context(torch.random.fork_rng(devices=cuda))
        yield


def _restore(target: dict, saved: dict) -> None:
    target.clear()
    target.update(saved)
