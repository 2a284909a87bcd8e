"""The method registry: what trains (full, freeze, lora, qlora, prompt_tuning).

Each entry says how it prepares a model, whether it trains an adapter (then the reference
model of DPO/PPO is the same model with the adapter switched off, and the run saves PEFT
files), how it loads the base (QLoRA: straight into NF4), and which config sections only it
reads. Callers ask the entry; nobody else compares method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lmtune.config import RunConfig
from lmtune.methods import full, lora, prompt_tuning, qlora
from lmtune.methods.prepared import Prepared
from lmtune.models.loading import load_causal_lm


@dataclass(frozen=True)
class Method:
    """One way of deciding what trains."""

    name: str
    adapter: bool  # saves an adapter, not a model; the reference model is the adapter switched off
    prepare: Callable[[nn.Module, Any, Path, RunConfig], Prepared]
    reads: tuple[str, ...] = ()  # config sections/keys only this method (among methods) uses
    refuses: dict[str, str] = field(default_factory=dict)  # key -> why this method cannot honour it
    load: Callable[[Path, RunConfig], nn.Module] | None = None  # its own way of loading the base

    def load_base(self, folder: Path, cfg: RunConfig) -> nn.Module:
        """The base causal LM, loaded the way this method needs it."""
        return self.load(folder, cfg) if self.load else load_causal_lm(folder, cfg.trust_remote_code)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", adapter=False, prepare=lambda m, tok, base, cfg: full.apply(m, tok, base, "full")),
    Method("freeze", adapter=False, reads=("freeze",),
           prepare=lambda m, tok, base, cfg: full.apply(m, tok, base, "freeze", cfg.freeze.layers)),
    Method("lora", adapter=True, reads=("lora",),
           prepare=lambda m, tok, base, cfg: lora.apply(m, tok, base, cfg.lora, cfg.train.seed)),
    Method("qlora", adapter=True, reads=("lora", "quant"),
           prepare=lambda m, tok, base, cfg: qlora.apply(m, tok, base, cfg.lora, cfg.quant, cfg.train.seed),
           load=lambda folder, cfg: qlora.load_quantized(folder, cfg.quant, cfg.trust_remote_code)),
    Method("prompt_tuning", adapter=True, reads=("prompt_tuning",),
           refuses={"train.compile": "the soft prompt is prepended outside the compiled body"},
           prepare=lambda m, tok, base, cfg: prompt_tuning.apply(m, tok, base, cfg.prompt_tuning, cfg.train.seed)),
)}
