"""Full fine-tuning (every weight trains) and partial fine-tuning (``freeze.layers``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.methods.freeze import freeze_layers
from lmtune.methods.prepared import Prepared
from lmtune.models.loading import save_model, weights_fingerprint


def apply(model: Any, tokenizer: Any, base_folder: Path, method: str = "full", frozen_layers: int = 0) -> Prepared:
    """Make every weight trainable, then (``freeze``) freeze the embeddings and the first blocks."""
    model.requires_grad_(True)
    if method == "freeze":
        freeze_layers(model, frozen_layers)

    def save(out: Path) -> None:
        save_model(model, tokenizer, out, {"base_model": str(base_folder), "method": method,
                                            "weights_fingerprint": weights_fingerprint(model)})

    return Prepared(model=model, save=save)
