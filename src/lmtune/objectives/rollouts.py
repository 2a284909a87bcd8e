"""What PPO and GRPO share around the loop: prompts, sampling from the policy, a resumable buffer.

Both objectives are batch sources of their own (``Task.batches``, a ``Batches``): when the buffer of
prepared micro-batches runs dry they sample a new batch of completions from the policy,
score it and cut it into micro-batches. A checkpoint carries the unused micro-batches and the
sampling counter, so a killed run resumes on exactly the micro-batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmtune.data.batching import epoch_order
from lmtune.data.chat import has_chat_template, prompt_ids, render
from lmtune.data.eval_cases import answer_stops
from lmtune.data.examples import encode, refuse_full_prompt
from lmtune.data.templates import apply_chat_setting
from lmtune.distributed import Dist, shard
from lmtune.errors import InputError
from lmtune.generate import generate
from lmtune.objectives.task import RunContext


def sample_completions(policy: nn.Module, prompt_ids: list[list[int]], pad_id: int, max_new_tokens: int,
                       temperature: float, seed: int | list[int], stop_ids: Iterable[int] = (),
                       top_k: int | None = None, top_p: float | None = None,
                       width: int | None = None) -> list[list[int]]:
    """Continue prompts (left-padded into one batch); a completion keeps its stop token if it stopped.

    ``seed``: one seed, or one per prompt (``row_seeds``); ``width``: pad to at least this many
    tokens (the widest prompt of the whole rollout, so a rank's share meets the same context limit).
    """
    width = max(width or 0, *map(len, prompt_ids))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids])  # (B, P)
    mask = (torch.arange(width) >= width - torch.tensor([[len(p)] for p in prompt_ids])).long()  # (B, P)
    return generate(policy, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop_ids=stop_ids, attention_mask=mask)


def prompt_indices(count: int, size: int, n: int, seed: int) -> list[int]:
    """Prompts of the ``count``-th sampling round of ``size``, walking seeded permutations epoch by epoch."""
    start = count * size
    return [epoch_order(n, seed, i // n)[i % n] for i in range(start, start + size)]


def row_seeds(base: int, rows: list[int]) -> list[int]:
    """The sampling seed of each rollout row, from the round's ``base`` seed and the row's global index.

    Row ``i`` draws the same tokens whichever rank samples it and whatever else is in its batch.
    """
    return [(base * 1_000_003 + i) % 2**63 for i in rows]


def split_micro_batches(rollout: dict[str, torch.Tensor], passes: int, batch_size: int,
                        generator: torch.Generator) -> list[dict[str, Any]]:
    """``passes`` shuffled passes over the rows of ``rollout`` in micro-batches of ``batch_size`` rows."""
    rows_total = next(iter(rollout.values())).shape[0]
    device = next(iter(rollout.values())).device
    micro = []
    for _ in range(passes):
        for rows in torch.randperm(rows_total, generator=generator).split(batch_size):
            rows = rows.to(device)
            micro.append({k: v[rows] for k, v in rollout.items()})
    return micro


def rank_micro_batches(rollout: dict[str, torch.Tensor], passes: int, batch_size: int, generator: torch.Generator,
                       ddp: Dist | None) -> list[dict[str, Any]]:
    """This rank's shares of the global micro-batches over a gathered rollout (every rank holds it all).

    The global micro-batches are one process's: ``batch_size × world`` rows, the same shuffle.
    A rank with no share of a short one gets its first row marked ``filler`` (trained with weight
    0), so every rank runs as many backward passes.
    """
    world = ddp.world if ddp else 1
    out = []
    for micro in split_micro_batches(rollout, passes, batch_size * world, generator):
        rows = next(iter(micro.values())).shape[0]
        mine = shard(list(range(rows)), ddp)
        filler = not mine
        take = torch.tensor(mine or [0], device=next(iter(micro.values())).device)
        share = {k: v[take] for k, v in micro.items()}
        if filler:
            share["filler"] = True
        out.append(share)
    return out


class BufferedSource:
    """A batch source that refills a buffer of micro-batches; subclasses define ``refill`` and
    ``total_steps`` (the ``Batches`` protocol of ``lmtune.objectives.task``).

    ``count`` counts the refills made (it picks their prompts and sampling seed); ``stats``
    are the last refill's metrics, logged with every step trained on it.
    """

    def __init__(self, model: nn.Module, warn: Callable[[str], None] | None = None):
        self.model = model
        self.buffer: list[dict[str, Any]] = []
        self.stats: dict[str, float] = {}
        self.count = 0
        self._warn = warn  # said once per run: the first warning a refill finds

    def warn_once(self, warning: str | None) -> None:
        """Log ``warning`` (if any) the first time a refill has one; later ones are not repeated."""
        if warning and self._warn is not None:
            self._warn(f"warning: {warning}")
            self._warn = None

    def refill(self, ddp: Dist | None = None) -> None:
        raise NotImplementedError

    def next(self, step: int, ddp: Dist | None) -> dict[str, Any]:
        if not self.buffer:
            self.refill(ddp)
        return self.buffer.pop(0)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The unused part of the current batch, for checkpoints: a resumed run trains on the
        same micro-batches instead of sampling new ones from weights that have moved on."""
        tensors = {f"buffer.{i}.{k}": v for i, micro in enumerate(self.buffer)
                   for k, v in micro.items() if torch.is_tensor(v)}
        plain = [{k: v for k, v in micro.items() if not torch.is_tensor(v)} for micro in self.buffer]
        return tensors, {"count": self.count, "stats": self.stats, "buffer": plain}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        device = next(self.model.parameters()).device
        self.count, self.stats = meta["count"], meta["stats"]
        self.buffer = [dict(plain) for plain in meta["buffer"]]
        for key, value in tensors.items():
            _, i, name = key.split(".", 2)
            self.buffer[int(i)][name] = value.to(device)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a PPO or GRPO prompts file."""

    value: str | list[dict[str, Any]]  # the file's string or chat messages
    ids: list[int]  # the chat template's rendering with a generation prompt, or BOS + prompt (raw text)
    columns: dict[str, Any]  # the record's other fields, for reward functions
    scored_ids: list[int] = dataclasses.field(default_factory=list)  # how a reward model saw it: BOS + raw prompt


def load_prompts(ctx: RunContext, key: str, objective: str) -> list[Prompt] | None:
    """The prompts of the file under config ``key`` (``None`` if unset) for PPO or GRPO.

    With a chat template (the model's own, or ``data.chat_template``), a string prompt is rendered
    as one user turn plus the generation prompt, as ``objective=sft`` trains and ``lmtune generate
    --chat`` asks; ``data.chat_template=none`` keeps it raw (BOS + text). Chat-message prompts are
    always rendered.

    Raises:
        InputError: a record without a usable ``prompt``, a chat prompt for a tokenizer with no
            template, or a prompt that leaves no room for a completion, naming file and line.
    """
    records = ctx.records(key)
    if records is None:
        return None
    tok, max_length = ctx.tokenizer, ctx.cfg.train.max_length
    chat_prompts = any(isinstance(rec.fields.get("prompt"), list) for rec in records)
    templated = apply_chat_setting(tok, ctx.cfg.data.chat_template, "messages" if chat_prompts else "prompts",
                                   may_add_tokens=False).templated
    prompts = []
    for rec in records:
        value = rec.fields.get("prompt", rec.fields.get("text"))
        columns = {k: v for k, v in rec.fields.items() if k not in ("prompt", "text")}
        if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            if not has_chat_template(tok):
                raise InputError(f"{rec.where}: the prompt is chat messages but the tokenizer has no chat template; "
                                 "give the prompt as a string, set data.chat_template, or use a model whose "
                                 "tokenizer has one")
            ids = encode(tok, render(tok, value, True, rec.where))
        elif isinstance(value, str) and value.strip():
            ids = prompt_ids(tok, value, False, rec.where)
        else:
            raise InputError(f"{rec.where}: a {objective} prompt must be a non-empty string or a list of chat "
                             "messages in 'prompt' (JSONL), or a line (TXT)")
        # Reward models train on BOS + prompt + response (objective=reward); the policy sees the template.
        scored = ids
        if isinstance(value, str) and templated:
            ids = prompt_ids(tok, value, True, rec.where)
        refuse_full_prompt(len(ids), max_length, rec.where)
        prompts.append(Prompt(value=value, ids=ids, columns=columns, scored_ids=scored))
    if not prompts:
        raise InputError(f"{ctx.source(key)}: no prompts")
    names = set(prompts[0].columns)
    for rec, p in zip(records, prompts, strict=True):
        if set(p.columns) != names:  # reward functions get one list per column: every row needs each
            raise InputError(f"{rec.where}: has columns {sorted(p.columns)} but the first prompt has "
                             f"{sorted(names)}; every prompt needs the same extra columns")
    return prompts


def stop_ids(tokenizer: Any) -> set[int]:
    """Where a sampled response ends: the chat template's end-of-turn token (if any) and EOS."""
    return set(answer_stops(tokenizer, has_chat_template(tokenizer)))


def unfinished_warning(share: float, cap: str, then: str) -> str | None:
    """A warning when nearly every response (over 90%) hit the length cap before its end token."""
    if share <= 0.9:
        return None
    return (f"{100 * share:.0f}% of the responses reached {cap} before the end-of-turn token (or EOS){then}; "
            "a chat model's answers take tens to hundreds of tokens: raise the cap")
