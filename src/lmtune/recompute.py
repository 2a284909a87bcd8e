"""``train.gradient_checkpointing``: keep only each block's input, recompute the rest in backward.

Activation memory of a transformer grows with batch × sequence × layers; checkpointing each
decoder block keeps one ``(batch, seq, hidden)`` tensor per block and recomputes the block's
insides during backward (one extra forward, ~1.3× the step time). It is what makes 2,048-token
sequences fit when plain training does not.

PyTorch's *non-reentrant* checkpoint is used: it gives gradients to parameters inside the block
even when the block's input does not require grad (LoRA and QLoRA with frozen embeddings), so
no ``enable_input_require_grads`` hook is needed, and it works with the 4-bit matmul of
``lmtune.quant`` (recomputation decodes the rows again; nothing dense is saved either way).
"""

from __future__ import annotations

from torch import nn

from lmtune.errors import InputError


def _transformers_model(model: nn.Module) -> nn.Module | None:
    """The outermost ``transformers`` model inside ``model`` (itself, or e.g. a prompt-tuning wrapper's)."""
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing_enable") and hasattr(module, "supports_gradient_checkpointing"):
            return module
    return None


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every decoder block of ``model`` (any method's model: plain, LoRA, QLoRA, prompt-tuned).

    Returns:
        The ``transformers`` model that now checkpoints.

    Raises:
        InputError: the architecture does not support gradient checkpointing.
    """
    inner = _transformers_model(model)
    if inner is None or not inner.supports_gradient_checkpointing:
        name = type(inner if inner is not None else model).__name__
        raise InputError(f"train.gradient_checkpointing=true: {name} does not support gradient checkpointing; "
                         "set train.gradient_checkpointing=false (or use a shorter train.max_length)")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(inner.config, "use_cache", False):
        inner.config.use_cache = False  # a KV cache is useless in training and fights recomputation
    return inner
