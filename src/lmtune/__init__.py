"""lmtune: fine-tune language models — full, partial, LoRA, QLoRA, prompt tuning, SFT, DPO, RLHF."""

import logging as _logging
import os as _os

__version__ = "0.1.0"

# Nothing is downloaded at run time, and library chatter (weight-loading progress bars,
# torchao's notes about CUDA kernels it cannot load on a CPU machine) would bury lmtune's
# own log. Defaults only: a user's explicit settings win.
for _name, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                      "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}.items():
    _os.environ.setdefault(_name, _value)
for _logger in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_logger).setLevel(_logging.ERROR)

# lmtune.compile(...) compiles a link graph into a model; the package is callable and imports
# nothing heavy until called (see lmtune/compile/__init__.py).
from lmtune import compile as compile  # noqa: E402,A004
