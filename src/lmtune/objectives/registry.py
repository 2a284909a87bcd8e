"""The objective registry: what the loss is (lm, sft, dpo, kto, reward, ppo, grpo, classify).

Each entry says which data formats it is the default for, how it builds its ``Task`` from a
``RunContext``, which config sections only it reads, which keys it cannot honour, and which
methods it trains with. Callers ask the entry; nobody else compares objective names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lmtune.objectives import (
    classify_task,
    dpo_task,
    grpo_task,
    kto_task,
    lm_task,
    ppo_task,
    reward_task,
    sft_task,
)
from lmtune.objectives.task import RunContext, Task


@dataclass(frozen=True)
class Objective:
    """One loss and everything around it."""

    name: str
    build: Callable[[RunContext], Task]
    default_for: tuple[str, ...] = ()  # data formats that select this objective when it is unset
    reads: tuple[str, ...] = ()  # config sections/keys only this objective (among objectives) uses
    refuses: dict[str, str] = field(default_factory=dict)  # key -> why this objective cannot honour it
    methods: tuple[str, ...] | None = None  # the methods it trains with (None: all)
    generative: bool = True  # needs a causal LM (encoders are refused)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("lm", lm_task.build_task, default_for=("text",)),
    Objective("sft", sft_task.build_task, default_for=("prompt_completion", "alpaca", "messages"),
              reads=("train.packing", "train.loss_on", "data.chat_template")),
    Objective("dpo", dpo_task.build_task, default_for=("preference",), reads=("dpo",)),
    Objective("kto", kto_task.build_task, default_for=("unpaired_preference",), reads=("kto",)),
    Objective("reward", reward_task.build_task, reads=("reward",), methods=("full", "freeze", "lora", "qlora")),
    Objective("ppo", ppo_task.build_task, default_for=("prompts",), reads=("ppo", "data.chat_template"),
              refuses={"train.compile": "rollouts sample token by token outside the compiled body"}),
    Objective("grpo", grpo_task.build_task, reads=("grpo", "data.chat_template"),
              refuses={"train.compile": "generations sample token by token outside the compiled body"}),
    Objective("classify", classify_task.build_task, default_for=("classification",), reads=("classify",),
              methods=("full", "freeze", "lora"), generative=False),
)}

DEFAULT_OBJECTIVE = {fmt: o.name for o in OBJECTIVES.values() for fmt in o.default_for}
