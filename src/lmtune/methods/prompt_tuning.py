"""Prompt tuning (Lester et al., 2021): a few trainable input embeddings before every input.

    input ids   ────────────►  embed  ─┐
    soft prompt (n × H, trains) ───────┴─► [p_1 … p_n, e_1 … e_T] ─► frozen model ─► drop the first n

The model stays frozen; only ``n × H`` numbers learn. The wrapper answers for the *real* tokens
only: ``forward`` returns their logits ``(B, T, V)`` and ``forward_hidden`` their hidden states,
so losses, generation and metrics need no change. Saved as PEFT's prompt-tuning adapter
(``prompt_embeddings``), which ``PeftModel.from_pretrained`` loads with equal logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtune.config import PromptTuningConfig
from lmtune.data.examples import encode
from lmtune.errors import InputError
from lmtune.methods.adapter_files import base_fingerprint, check_base, pop_saved_modules, write_adapter_folder
from lmtune.methods.prepared import Prepared

INIT_HELP = "prompt_tuning.init must be random, vocab, or text:<words>"


class PromptTuned(nn.Module):
    """A frozen causal LM behind ``num_virtual_tokens`` trainable input embeddings.

    Args:
        model: the causal LM (frozen here).
        prompt: initial soft prompt ``(n, H)``.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor):
        super().__init__()
        model.requires_grad_(False)
        self.model = model
        self.config = model.config
        self.prompt_embeddings = nn.Parameter(prompt.detach().clone().float())  # (n, H)
        self.prompt_enabled = True  # off inside disable_adapter(): the base model's outputs

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states of the real tokens, ``(B, T, H)``."""
        body = self.model.base_model
        if not self.prompt_enabled:
            return body(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids).last_hidden_state  # (B, T, H)
        b, n = input_ids.shape[0], self.num_virtual_tokens
        tokens = self.get_input_embeddings()(input_ids)  # (B, T, H)
        prompt = self.prompt_embeddings.to(tokens.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, n, H)
        embeds = torch.cat([prompt, tokens], dim=1)  # (B, n+T, H)
        if attention_mask is not None:  # the soft prompt is always attended to
            attention_mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)  # (B, n+T)
        if position_ids is not None:  # real tokens move n places to the right
            lead = torch.arange(n, device=position_ids.device).expand(b, -1)  # (B, n)
            position_ids = torch.cat([lead, position_ids + n], dim=1)  # (B, n+T)
        hidden = body(inputs_embeds=embeds, attention_mask=attention_mask,
                      position_ids=position_ids).last_hidden_state  # (B, n+T, H)
        return hidden[:, n:]  # (B, T, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the real tokens, ``(B, T, V)``."""
        return self.get_output_embeddings()(self.forward_hidden(input_ids, attention_mask, position_ids))


def initial_prompt(model: nn.Module, tokenizer: Any, n: int, init: str, seed: int = 0) -> torch.Tensor:
    """The starting soft prompt ``(n, H)``.

    ``random``: normal noise at the scale of the vocabulary embeddings (PEFT's N(0, 1) is far
    larger than a trained model's embeddings and slows the start); ``vocab``: the embeddings of
    ``n`` random vocabulary words; ``text:<words>``: the embeddings of the text's tokens,
    repeated or cut to ``n`` (Lester et al. found this the best start).
    """
    table = model.get_input_embeddings().weight.detach()  # (V, H)
    g = torch.Generator().manual_seed(seed)
    if init == "random":
        return torch.randn(n, table.shape[1], generator=g) * table.float().std()
    if init == "vocab":
        return table[torch.randint(0, table.shape[0], (n,), generator=g)].clone()
    if init.startswith("text:"):
        ids = encode(tokenizer, init[5:].strip(), "text", f"prompt_tuning.init={init!r}")
        if not ids:
            raise InputError(f"prompt_tuning.init={init!r}: the text has no tokens; {INIT_HELP}")
        ids = (ids * (n // len(ids) + 1))[:n]
        return table[torch.tensor(ids)].clone()
    raise InputError(f"{INIT_HELP}; got {init!r}")


def _peft_config(model: PromptTuned, init: str, base_folder: Path | str | None) -> dict[str, Any]:
    cfg = model.config
    kind = "TEXT" if init.startswith("text:") else ("SAMPLE_VOCAB" if init == "vocab" else "RANDOM")
    return {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": model.prompt_embeddings.shape[1], "num_transformer_submodules": 1,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "prompt_tuning_init": kind, "prompt_tuning_init_text": init[5:].strip() if kind == "TEXT" else None,
        # PEFT wants a tokenizer for TEXT even though it only uses it when creating a new prompt.
        "tokenizer_name_or_path": str(base_folder) if kind == "TEXT" and base_folder is not None else None,
        "base_model_name_or_path": str(base_folder) if base_folder is not None else None,
        "inference_mode": True,
    }


def save_prompt_adapter(model: PromptTuned, out: Path, tokenizer: Any, init: str = "random",
                        base_folder: Path | str | None = None, meta: dict[str, Any] | None = None) -> None:
    """Write the soft prompt as a PEFT prompt-tuning folder (+ tokenizer and lmtune's side file)."""
    meta = {"adapter": "prompt_tuning", "base_fingerprint": base_fingerprint(model.model),
            "base_model": str(base_folder) if base_folder is not None else None, "init": init, **(meta or {})}
    tensors = {"prompt_embeddings": model.prompt_embeddings.detach().float().cpu().contiguous()}
    write_adapter_folder(Path(out), _peft_config(model, init, base_folder), tensors, tokenizer, meta)


def load_prompt_adapter(model: nn.Module, folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any], tokenizer: Any = None) -> PromptTuned:
    """Wrap ``model`` with the soft prompt of a PEFT prompt-tuning folder (read by ``load_adapter``)."""
    check_base(folder, meta, model, tokenizer)
    saved = pop_saved_modules(folder, config, tensors, model, prefix="base_model.")  # e.g. chat-token embeddings
    if set(tensors) != {"prompt_embeddings"}:
        raise InputError(f"{folder}: a prompt-tuning adapter holds one tensor, prompt_embeddings; found "
                         f"{', '.join(sorted(tensors))}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise InputError(f"{folder}: prompt tuning for encoder-decoder models is not supported")
    prompt = tensors["prompt_embeddings"]
    hidden = model.get_input_embeddings().weight.shape[1]
    n = config.get("num_virtual_tokens")
    if prompt.dim() != 2 or prompt.shape[1] != hidden or (n is not None and prompt.shape[0] != n):
        raise InputError(f"{folder}: prompt_embeddings has shape {tuple(prompt.shape)}; this model needs "
                         f"({n}, {hidden}): the adapter belongs to another base model")
    with torch.no_grad():
        for module, params in saved.items():
            model.get_submodule(module).load_state_dict(params)
    wrapped = PromptTuned(model, prompt)
    wrapped.prompt_embeddings.requires_grad_(False)
    return wrapped


def apply(model: Any, tokenizer: Any, base_folder: Path, section: PromptTuningConfig, seed: int) -> Prepared:
    """``method=prompt_tuning``: freeze the model and prepend a trainable soft prompt (``section``: its keys)."""
    init = section.init
    n = section.num_virtual_tokens
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and n >= limit:
        raise InputError(f"prompt_tuning.num_virtual_tokens={n} leaves no room for input: the model reads at "
                         f"most {limit} positions")
    wrapped = PromptTuned(model, initial_prompt(model, tokenizer, n, init, seed))

    def save(out: Path) -> None:
        save_prompt_adapter(wrapped, out, tokenizer, init, base_folder, {"method": "prompt_tuning"})

    return Prepared(model=wrapped, save=save, summary={"num_virtual_tokens": n,
                                                       "adapter_params": wrapped.prompt_embeddings.numel()})
