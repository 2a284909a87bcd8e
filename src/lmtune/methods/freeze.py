"""Partial fine-tuning: freeze the embeddings and the first N transformer blocks.

Early blocks hold the most general features and change least in fine-tuning; freezing them
saves their gradients and optimizer state and limits forgetting. With tied input/output
embeddings (GPT-2) the output head freezes with the embeddings.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmtune.errors import InputError


def transformer_blocks(model: Any) -> nn.ModuleList:
    """The model's list of transformer blocks (GPT-2 ``h``, Llama ``layers``, BERT ``encoder.layer``)."""
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and len(module) > 0:
            return module
    raise InputError(f"could not find the transformer blocks of {type(model).__name__} "
                     f"(looked for a list of {n_layers} modules)")


def freeze_layers(model: Any, n: int) -> None:
    """Freeze every embedding and the first ``n`` blocks; everything else keeps its flag.

    Raises:
        InputError: ``n`` exceeds the number of blocks.
    """
    blocks = transformer_blocks(model)
    if n > len(blocks):
        raise InputError(f"freeze.layers={n} but the model has only {len(blocks)} transformer blocks")
    for name, module in model.named_modules():
        # BERT-style encoders keep a LayerNorm inside their ``embeddings`` block: it freezes with it.
        if isinstance(module, nn.Embedding) or name.rsplit(".", 1)[-1] == "embeddings":
            module.requires_grad_(False)
    for block in blocks[:n]:
        block.requires_grad_(False)
