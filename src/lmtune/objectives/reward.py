"""Reward models: a scalar head on a language model, trained with the Bradley–Terry loss.

A reward model scores a whole text with one number, read from the final hidden state of the
last real token. It is a plain ``transformers`` ``*ForSequenceClassification`` model with one
label, so ``AutoModelForSequenceClassification.from_pretrained(folder)`` loads what
``objective=reward`` writes, and PPO loads it back with ``load_reward_model`` — also a LoRA
reward model's adapter folder (the base named in it, the adapter and the trained head on top).

Which token is "last" is decided by the attention mask, so right and left padding both work.
Texts are scored *without* a trailing EOS: lmtune's tokenizers usually pad with the EOS id,
and ``transformers`` finds the last token as the last one that is not padding — with no EOS
appended, its reading and ours are the same position.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmtune.data.batching import last_token_index
from lmtune.errors import InputError
from lmtune.methods.adapter_files import CONFIG_FILE, read_adapter_folder
from lmtune.methods.adapters import load_adapter
from lmtune.models.loading import check_tokenizer, load_tokenizer, resolve_model_dir
from lmtune.objectives.lm import final_hidden


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean Bradley–Terry loss ``−log σ(r_c − r_r − m)`` plus optional reward centring.

    The formula of TRL's ``RewardTrainer`` (tests check it within 1e-6). Centring adds
    ``c · mean((r_c + r_r)²)``, which pins the reward's free offset near zero (Eisenstein
    et al., 2023) so scores stay comparable across runs.

    Args:
        chosen: (B,) scores of the chosen texts.
        rejected: (B,) scores of the rejected texts.
        margin: (B,) how much the chosen should win by (e.g. a rating gap), or ``None``.
        center_coef: weight ``c`` of the centring term (0: off).

    Returns:
        ``(loss, metrics)``: the scalar loss and ``accuracy`` (share of pairs ranked right),
        ``margin`` (mean r_c − r_r), ``mean_reward``, ``min_reward``, ``max_reward``.
    """
    diff = chosen - rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    with torch.no_grad():
        both = torch.cat([chosen, rejected]).float()  # (2B,)
        metrics = {"accuracy": (chosen > rejected).float().mean().item(),
                   "margin": (chosen - rejected).float().mean().item(),
                   "mean_reward": both.mean().item(), "min_reward": both.min().item(),
                   "max_reward": both.max().item()}
    return loss, metrics


def reward_scores(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Scores (B,) of a batch of texts: the head applied to the last real token's hidden state.

    Only the B scored rows go through the head, not all B×T positions.
    """
    hidden = final_hidden(model, batch)  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)  # (B,)
    last = hidden[rows, last_token_index(batch["attention_mask"])]  # (B, H)
    return model.score(last).squeeze(-1).float()  # (B,)


def new_reward_model(folder: Path, pad_token_id: int, trust_remote_code: bool = False) -> Any:
    """A reward model from a causal LM folder: its body, and a fresh one-output head.

    Raises:
        InputError: the architecture has no ``*ForSequenceClassification`` class.
    """
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, pad_token_id=pad_token_id, local_files_only=True, use_safetensors=True,
            trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (ValueError, KeyError) as e:
        raise InputError(f"{folder}: cannot put a reward head on this model ({e}); objective=reward needs an "
                         "architecture with a transformers *ForSequenceClassification class") from None


def load_reward_model(path: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a reward model folder (as ``objective=reward`` writes) and its tokenizer, for scoring.

    Raises:
        InputError: the folder is missing or is not a one-label sequence-classification model
            (e.g. a causal LM, or a language model's adapter), naming what it holds instead.
    """
    from transformers import AutoModelForSequenceClassification


    folder = Path(path)
    if folder.is_dir() and (folder / CONFIG_FILE).is_file() and not (folder / "config.json").is_file():
        return _load_reward_adapter(folder, trust_remote_code)
    folder = resolve_model_dir(folder)
    if folder.is_file():
        raise InputError(f"ppo.reward_model={folder} is a GGUF language model, not a reward model; give the folder a "
                         "run with objective=reward wrote")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{folder}/config.json is not valid JSON ({e})") from None
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or labels != 1:
        raise InputError(f"{folder} is not a reward model: its config.json names {architectures or 'no architecture'} "
                         f"with {labels} label(s); a reward model is a *ForSequenceClassification with one label, "
                         "as a run with objective=reward writes")
    tokenizer = load_tokenizer(folder, trust_remote_code)
    check_tokenizer(folder, tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code,
        dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model, tokenizer


def _load_reward_adapter(folder: Path, trust_remote_code: bool) -> tuple[Any, Any]:
    """A LoRA reward model: the base it names as a one-label classifier, the adapter and head loaded on it."""
    config, _, meta = read_adapter_folder(folder)
    if config.get("task_type") != "SEQ_CLS" or "score" not in (config.get("modules_to_save") or []):
        raise InputError(f"ppo.reward_model={folder} is the adapter of a language model (task_type "
                         f"{config.get('task_type')}), not a reward model; give the folder a run with objective=reward "
                         "wrote")
    base = meta.get("base_model") or config.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{folder}: the reward adapter names no base model (lmtune.json base_model)")
    tokenizer = load_tokenizer(folder, trust_remote_code)  # saved with the adapter, fingerprint checked below
    model = new_reward_model(resolve_model_dir(base), tokenizer.pad_token_id, trust_remote_code)
    model = load_adapter(model, folder, tokenizer)
    model.eval().requires_grad_(False)
    return model, tokenizer
