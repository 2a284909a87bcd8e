"""Objective ``grpo``: group-relative policy optimisation with verifiable rewards.

A batch source of its own, like PPO's: when the buffer is empty, ``grpo.generation_batch_size``
prompts are each answered ``grpo.num_generations`` times by the policy (temperature, top-p,
top-k, at most ``grpo.max_completion_length`` tokens), scored by the reward functions
(``grpo.reward_fns``, see ``lmtune.objectives.reward_fns``) and/or a reward-model folder,
weighted (``grpo.reward_weights``) and turned into group-relative advantages. The sampling
policy's log-probs (and the reference's, when ``grpo.beta > 0``) are stored with the batch,
which then yields ``grpo.num_iterations`` shuffled passes of ``train.batch_size``
completions; each loop step trains on one with ``grpo_loss``. No value model.

Data: a prompts file whose ``prompt`` is a string or a list of chat messages (rendered with
the chat template and a generation prompt); every other column (an ``answer``, say) goes to
the reward functions as a keyword list.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmtune.config import GRPOConfig, TrainConfig
from lmtune.distributed import Dist, gather_rows, shard
from lmtune.errors import InputError
from lmtune.objectives.grpo import group_advantages, grpo_loss
from lmtune.objectives.ppo_task import layout, model_scorer, response_logprobs
from lmtune.objectives.reference import Reference, disable_dropout
from lmtune.objectives.reward_fns import BatchReward, load_reward_fns
from lmtune.objectives.rollouts import (
    BufferedSource,
    Prompt,
    load_prompts,
    prompt_indices,
    rank_micro_batches,
    row_seeds,
    sample_completions,
    stop_ids,
    unfinished_warning,
)
from lmtune.objectives.task import RunContext, Task


class Generations(BufferedSource):
    """Samples groups of completions, scores them and prepares GRPO micro-batches: the loop's
    batch source for ``objective=grpo``."""

    def __init__(self, policy: nn.Module, reference: Reference | None, fns: list[BatchReward],
                 reward_model: Any, weights: torch.Tensor, prompts: list[Prompt], tokenizer: Any,
                 grpo: GRPOConfig, batch_size: int, seed: int, warn: Callable[[str], None] | None = None):
        super().__init__(policy, warn)  # warned once, when nearly every completion of a batch hit the length cap
        self.reference, self.fns, self.reward_model, self.weights = reference, fns, reward_model, weights
        self.prompts, self.tokenizer, self.grpo, self.batch_size, self.seed = prompts, tokenizer, grpo, batch_size, seed
        self.stops = stop_ids(tokenizer)

    def total_steps(self, train: TrainConfig, world: int) -> int:
        """``train.epochs`` counts passes over the prompts: each generation batch gives
        ``grpo.num_iterations`` passes of micro-batches over its completions (under torchrun a
        micro-batch is ``train.batch_size × world`` completions of the gathered batch)."""
        grpo = self.grpo
        completions = grpo.generation_batch_size * grpo.num_generations
        per_batch = grpo.num_iterations * math.ceil(completions / (train.batch_size * world)) / train.grad_accum
        batches = train.epochs * len(self.prompts) / grpo.generation_batch_size
        return max(1, math.ceil(batches * per_batch))

    def sample(self, prompt_ids: list[list[int]], temperature: float, seed: int | list[int],
               width: int | None = None) -> list[list[int]]:
        top_k, top_p = self.grpo.top_k, self.grpo.top_p
        return sample_completions(self.model, prompt_ids, self.tokenizer.pad_token_id,
                                  self.grpo.max_completion_length, temperature, seed, self.stops,
                                  top_k=top_k or None, top_p=top_p if top_p < 1 else None, width=width)

    def score(self, indices: list[int], completions: list[list[int]]) -> torch.Tensor:
        """(N, K) rewards of each source (functions, then the reward model) for each completion."""
        bare = [c[:-1] if c and c[-1] in self.stops else c for c in completions]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in bare]
        rows = [self.prompts[i] for i in indices]
        prompts = [p.value for p in rows]
        columns = {name: [p.columns[name] for p in rows] for name in rows[0].columns}
        per_source = [fn(prompts, texts, columns) for fn in self.fns]
        if self.reward_model is not None:
            text_prompts = [p if isinstance(p, str) else self.tokenizer.decode(r.ids, skip_special_tokens=True)
                            for p, r in zip(prompts, rows, strict=True)]
            per_source.append(self.reward_model(text_prompts, texts, [p.scored_ids for p in rows], bare).double())
        return torch.stack(per_source, dim=1)  # (N, K)

    def _generate(self, indices: list[int], rows: list[int], base: int) -> dict[str, torch.Tensor]:
        """Sample, score and measure completions ``rows`` (positions in ``indices``): one rank's share."""
        temperature = self.grpo.temperature
        prompt_ids = [self.prompts[indices[j]].ids for j in rows]
        width = max(len(self.prompts[i].ids) for i in indices)
        completions = self.sample(prompt_ids, temperature, row_seeds(base, rows), width)
        per_source = self.score([indices[j] for j in rows], completions)  # (n, K)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in layout(prompt_ids, completions, self.tokenizer.pad_token_id).items()}
        mask = batch["response_mask"]
        old_logps, _ = response_logprobs(self.model, batch, temperature)  # (n, R)
        local = {**batch, "old_logps": old_logps * mask, "per_source": per_source.to(device),
                 "stopped": torch.tensor([bool(c) and c[-1] in self.stops for c in completions], device=device)}
        if self.reference is not None:
            with self.reference.model(device) as ref:
                local["ref_logps"] = response_logprobs(ref, batch, temperature)[0] * mask  # (n, R)
        return local

    @torch.no_grad()
    def refill(self, ddp: Dist | None = None) -> None:
        """Generate the next batch: under torchrun each rank samples its share, then all gather it.

        Every completion samples with its own seed (``row_seeds``); group advantages are taken
        over the gathered batch, so the micro-batches are one process's.
        """
        grpo, seed, g = self.grpo, self.seed, self.grpo.num_generations
        picked = prompt_indices(self.count, grpo.generation_batch_size, len(self.prompts), seed)
        indices = [i for i in picked for _ in range(g)]  # (N = P·G) a group's completions are consecutive
        base = seed * 1_000_003 + self.count
        mine = shard(list(range(len(indices))), ddp)
        local = self._generate(indices, mine, base) if mine else {}
        rollout = gather_rows(local, ddp, {"input_ids": self.tokenizer.pad_token_id})
        per_source, stopped = rollout.pop("per_source").cpu(), rollout.pop("stopped").cpu()
        rewards = per_source @ self.weights  # (N,)
        advantages, tied = group_advantages(rewards, g, grpo.scale_rewards)  # (N,), (P,)
        rollout["advantages"] = advantages.to(rollout["old_logps"].device, torch.float32)

        lengths = rollout["response_mask"].sum(1)  # (N,)
        names = [f.name for f in self.fns] + (["reward_model"] if self.reward_model is not None else [])
        self.stats = {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                      "frac_reward_zero_std": tied.float().mean().item(),
                      "completions/mean_length": lengths.float().mean().item(),
                      "completions/max_length": lengths.max().item(),
                      "completions/clipped_ratio": (~stopped).float().mean().item()}
        for k, name in enumerate(names):
            self.stats[f"rewards/{name}/mean"] = per_source[:, k].mean().item()
            self.stats[f"rewards/{name}/std"] = per_source[:, k].std().item()
        generator = torch.Generator().manual_seed(base)
        per_token = grpo.loss_type == "dapo"
        for micro in rank_micro_batches(rollout, grpo.num_iterations, self.batch_size, generator, ddp):
            tokens = int(micro["response_mask"].sum())
            # The loop divides the summed loss by the window's units: tokens for DAPO, sequences otherwise.
            micro["num_loss_tokens"] = tokens if per_token else int(micro["response_mask"].shape[0])
            micro["num_tokens"] = tokens
            self.buffer.append(micro)
        self.count += 1
        cap = f"grpo.max_completion_length={grpo.max_completion_length}"
        self.warn_once(unfinished_warning(self.stats["completions/clipped_ratio"], cap,
                                          ", so they were scored unfinished"))


def check_config(grpo: GRPOConfig) -> None:
    """Reject GRPO settings that cannot work, before any model loads."""
    if not grpo.reward_fns and not grpo.reward_model:
        raise InputError("objective=grpo needs a reward: grpo.reward_fns=[module:function, ...] and/or "
                         "grpo.reward_model=<folder written by objective=reward>")
    if grpo.num_generations < 2:
        raise InputError(f"grpo.num_generations must be at least 2: advantages compare a completion with the others "
                         f"of its group; got {grpo.num_generations}")
    high = grpo.epsilon_high
    if high is not None and high < grpo.epsilon:
        raise InputError(f"grpo.epsilon_high={high} is below grpo.epsilon={grpo.epsilon}; clip-higher "
                         "widens the upper bound (leave it unset to use grpo.epsilon)")


def build_task(ctx: RunContext) -> Task:
    """GRPO task: generation batches feed micro-batches; the loss is ``grpo_loss``."""
    cfg, grpo = ctx.cfg, ctx.cfg.grpo
    check_config(grpo)
    prompts, eval_prompts = load_prompts(ctx, "data.train", "GRPO"), load_prompts(ctx, "data.eval", "GRPO")
    reward_model = None
    if grpo.reward_model:
        reward_model = model_scorer(grpo.reward_model, ctx.tokenizer, cfg.trust_remote_code)
    fns, weights = load_reward_fns(grpo.reward_fns, grpo.reward_weights, int(reward_model is not None))
    model = ctx.load_causal_lm()
    disable_dropout(model)
    prepared = ctx.apply_method(model)
    policy = prepared.model
    # Without the KL term nothing reads the reference: no frozen copy of a fully trained model.
    reference = Reference(policy, ctx.method.adapter) if grpo.beta > 0 else None
    batch_size, seed = cfg.train.batch_size, cfg.train.seed
    source = Generations(policy, reference, fns, reward_model, weights, prompts, ctx.tokenizer, grpo, batch_size,
                         seed, warn=ctx.log.say)

    def loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logps, _ = response_logprobs(model, batch, grpo.temperature)  # (B, R)
        mean, metrics = grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"],
                                  batch["response_mask"], grpo.epsilon, grpo.epsilon_high, grpo.beta,
                                  grpo.loss_type, grpo.max_completion_length)
        return mean * batch["num_loss_tokens"], {**source.stats, **metrics}

    evaluators = {}
    if eval_prompts:
        def eval_reward(model: Any) -> float:
            """Mean total reward of greedy completions to the held-out prompts."""
            held_out = Generations(model, None, fns, reward_model, weights, eval_prompts, ctx.tokenizer, grpo,
                                   batch_size, seed)
            indices = list(range(len(eval_prompts)))
            completions = held_out.sample([p.ids for p in eval_prompts], 0.0, seed)
            return (held_out.score(indices, completions) @ weights).mean().item()
        evaluators["eval_reward"] = eval_reward

    return Task(model=policy, batches=source, loss=loss, save=prepared.save, evaluators=evaluators,
                summary={"grpo": dataclasses.asdict(grpo), **prepared.summary})
