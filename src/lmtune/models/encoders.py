"""Tell encoders from causal LMs, and load any model with a sequence-classification head.

BERT-family encoders (BERT, RoBERTa, MiniLM, DistilBERT, ...) read the whole text at once and
have no next-token head worth using: ``transformers`` will even build a ``BertLMHeadModel``
from a BERT folder, with a random head, if asked for a causal LM. So lmtune decides from the
folder's ``config.json`` which kind a model is, refuses encoders where generation is needed,
and loads every model for classification through ``AutoModelForSequenceClassification`` —
safetensors only, ``trust_remote_code`` off unless asked, nothing downloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmtune.errors import InputError
from lmtune.models.gguf import gguf_config, is_gguf
from lmtune.models.metadata import check_config


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json`` (or a GGUF file's config) as a dict, sizes checked (``models.metadata``)."""
    if is_gguf(Path(folder)):
        return gguf_config(Path(folder))
    return check_config(folder)


def is_encoder(folder: Path) -> bool:
    """True for a bidirectional encoder (BERT-style), false for causal LMs and encoder-decoders.

    An encoder is a model type with a masked-LM head in ``transformers`` that is configured
    neither as a decoder nor as an encoder-decoder (BART also has a masked-LM class).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = read_config(folder)
    return (config.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder", False)
            and not config.get("is_encoder_decoder", False))


def refuse_encoder(folder: Path) -> None:
    """Raise the error for code that needs a causal LM but was given an encoder.

    Raises:
        InputError: ``folder`` holds a BERT-style encoder.
    """
    if is_encoder(folder):
        kind = read_config(folder).get("model_type")
        raise InputError(
            f"{folder} is a {kind} encoder: encoders read text but don't generate it, so it cannot be used "
            "where a causal language model is needed (objective=lm, sft, dpo, kto, ppo, grpo, reward; generate; "
            "perplexity). Fine-tune an encoder with objective=classify on text+label data.")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # A new head is *meant* to be missing from the checkpoint; transformers' load report
    # would print it as a table of MISSING keys on every run.
    from transformers.utils import logging

    old, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(old)
        if bar:
            logging.enable_progress_bar()


def load_for_classification(folder: Path, num_labels: int, pad_token_id: int | None,
                            trust_remote_code: bool = False, labels: list[str] | None = None) -> Any:
    """Load an encoder or a causal LM with ``transformers``' own sequence-classification head.

    The body comes from the checkpoint; a head the checkpoint lacks is newly initialised.
    A folder that already holds a classifier with ``num_labels`` outputs keeps its head.

    Args:
        folder: a checked model folder (``resolve_model_dir``).
        num_labels: outputs of the head.
        pad_token_id: set on the config: causal-LM classifiers find the last real token by it.
        trust_remote_code: run code shipped in the folder (off unless the user asked).
        labels: class names, saved as the config's ``id2label`` so ``transformers`` shows them.

    Returns:
        The ``...ForSequenceClassification`` model in float32.

    Raises:
        InputError: the architecture has no sequence-classification class, needs remote code,
            or its weights do not load.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    names = labels or [str(i) for i in range(num_labels)]
    extra = {"num_labels": num_labels, "id2label": dict(enumerate(names)),
             "label2id": {n: i for i, n in enumerate(names)}}
    if pad_token_id is not None:
        extra["pad_token_id"] = pad_token_id
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code,
                dtype=torch.float32, ignore_mismatched_sizes=True, **extra)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"{folder} needs custom code to load; set trust_remote_code=true only if you "
                             "trust the folder's author") from None
        raise InputError(f"{folder}: transformers has no sequence-classification model for model_type "
                         f"'{read_config(folder).get('model_type')}' ({e})") from None
    except OSError as e:
        raise InputError(f"{folder}: could not load the model: {e}") from None
    model.config.problem_type = "single_label_classification"
    return model


