"""Full fine-tuning (every weight trains) and partial fine-tuning (``freeze.layers``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.methods import Prepared
from lmtune.methods.freeze import freeze_layers
from lmtune.models.loading import save_model, weights_fingerprint


def apply(model: Any, tokenizer: Any, cfg: dict[str, Any], base_folder: Path) -> Prepared:
    """Make every weight trainable, then freeze the embeddings and first blocks for ``freeze``."""
    model.requires_grad_(True)
    if cfg["method"] == "freeze":
        freeze_layers(model, cfg["freeze.layers"])

    def save(out: Path) -> None:
        save_model(model, tokenizer, out, {"base_model": str(base_folder), "method": cfg["method"],
                                            "weights_fingerprint": weights_fingerprint(model)})

    return Prepared(model=model, save=save)
