"""Objective ``ppo``: RLHF with PPO — rollouts from the policy, a KL leash, the same optimizer step.

Around the one training loop this adds a rollout phase (the task's batch source): when the buffer
of prepared micro-batches is empty, ``ppo.rollout_batch_size`` prompts are continued by the
policy (sampled at ``ppo.temperature``), scored by a reward model folder or a Python function,
penalised per token by ``kl_coef · (log π − log π_ref)``, and turned into GAE advantages. The
buffer then holds ``ppo.epochs`` shuffled passes over that rollout in micro-batches of
``train.batch_size``; each loop step trains on one (clipped policy loss + ``vf_coef`` × clipped
value loss). The value head is a linear layer on the policy's final hidden states; only the
policy is saved.

Reward functions: ``ppo.reward_fn=module:function`` is called as ``f(prompt, response)`` if it
takes two arguments, else ``f(response)``, and must return a finite number.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmtune.config import PPOConfig, TrainConfig
from lmtune.data.batching import pad_rows
from lmtune.data.examples import encode, special_ids
from lmtune.distributed import Dist, gather_rows, shard
from lmtune.errors import InputError
from lmtune.models.loading import tokenizer_fingerprint
from lmtune.objectives import rollouts as shared
from lmtune.objectives.lm import final_hidden, output_head
from lmtune.objectives.ppo import gae, masked_whiten, per_token_rewards, policy_loss, value_loss
from lmtune.objectives.reference import Reference, disable_dropout
from lmtune.objectives.reward import load_reward_model, reward_scores
from lmtune.objectives.reward_fns import resolve_callable
from lmtune.objectives.rollouts import (
    BufferedSource,
    prompt_indices,
    rank_micro_batches,
    row_seeds,
    sample_completions,
    stop_ids,
    unfinished_warning,
)
from lmtune.objectives.task import RunContext, Task

Scorer = Callable[[list[str], list[str], list[list[int]], list[list[int]]], torch.Tensor]


class PolicyWithValue(nn.Module):
    """The policy and a scalar value head on its final hidden states (what the loop trains)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(output_head(policy).weight.shape[1], 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no bias before any return is seen
        nn.init.zeros_(self.value_head.bias)


def load_reward_fn(spec: str) -> Callable[[str, str], float]:
    """Resolve ``module:function`` to ``f(prompt, response)``.

    Raises:
        InputError: malformed spec, module not importable, or no such callable.
    """
    fn = resolve_callable(spec, "ppo.reward_fn")
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return fn
    return lambda prompt, response: fn(response)


def function_scorer(spec: str) -> Scorer:
    """Scores from a Python function; raising or returning a non-finite value stops the run."""
    fn = load_reward_fn(spec)

    def score(prompts: list[str], responses: list[str], *_: Any) -> torch.Tensor:
        values = []
        for prompt, response in zip(prompts, responses, strict=True):
            try:
                value = fn(prompt, response)
            except Exception as e:  # the user's code: report it as their error, with its input
                raise InputError(f"ppo.reward_fn={spec} raised {type(e).__name__}: {e} (prompt {prompt!r}, "
                                 f"response {response!r}); fix the function") from None
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            if isinstance(value, bool) or not math.isfinite(number):
                raise InputError(f"ppo.reward_fn={spec} returned {value!r} for prompt {prompt!r}, response "
                                 f"{response!r}; it must return a finite number")
            values.append(number)
        return torch.tensor(values)

    return score


def model_scorer(path: str, policy_tokenizer: Any, trust_remote_code: bool) -> Scorer:
    """Scores from a reward-model folder, fed as it was trained: BOS + prompt + response, no EOS."""

    model, tok = load_reward_model(path, trust_remote_code)
    same_tokens = tokenizer_fingerprint(tok) == tokenizer_fingerprint(policy_tokenizer)
    bos = special_ids(tok)[0]

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str], prompt_ids: list[list[int]],
              response_ids: list[list[int]]) -> torch.Tensor:
        if same_tokens:
            rows = [p + r for p, r in zip(prompt_ids, response_ids, strict=True)]
        else:  # another tokenizer: re-encode the texts the way reward pairs are encoded
            rows = [([bos] if bos is not None else []) + encode(tok, p) + encode(tok, r)
                    for p, r in zip(prompts, responses, strict=True)]
        ids, mask = pad_rows(rows, tok.pad_token_id)  # (B, T)
        return reward_scores(model, {"input_ids": ids, "attention_mask": mask}).cpu()

    return score


def response_logprobs(model: nn.Module, batch: dict[str, Any], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens under ``model`` and the hidden states that predict them.

    Args:
        batch: ``input_ids``/``attention_mask`` (B, T) of prompt + response, right-padded;
            ``response_index`` (B, R): position of the hidden state predicting response token j;
            ``response_ids`` (B, R).

    Returns:
        ``(logprobs (B, R), hidden (B, R, H))``; entries past a response's end are garbage and
        are masked by the caller.
    """
    hidden = final_hidden(model, batch)  # (B, T, H)
    index = batch["response_index"]  # (B, R)
    h = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, R, H)
    logits = output_head(model)(h).float() / temperature  # (B, R, V): the distribution that was sampled
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)
    return logp, h  # (B, R), (B, R, H)


class Rollouts(BufferedSource):
    """Samples, scores and prepares PPO micro-batches: the loop's batch source for ``objective=ppo``."""

    def __init__(self, model: PolicyWithValue, reference: Reference, scorer: Scorer,
                 prompts: list[tuple[str, list[int], list[int]]], tokenizer: Any, ppo: PPOConfig, batch_size: int,
                 seed: int,
                 warn: Callable[[str], None] | None = None):
        super().__init__(model, warn)  # warned once, when nearly every response of a rollout missed its end token
        self.reference, self.scorer, self.prompts = reference, scorer, prompts
        self.tokenizer, self.ppo, self.batch_size, self.seed = tokenizer, ppo, batch_size, seed
        self.stops = stop_ids(tokenizer)  # a chat model ends its turn with <|im_end|> (or the like), not EOS

    def total_steps(self, train: TrainConfig, world: int) -> int:
        """``train.epochs`` counts passes over the prompts: each rollout gives ppo.epochs passes of micro-batches.

        Under torchrun a micro-batch is ``train.batch_size × world`` rows of the gathered rollout,
        so the count is one process's with that batch, whatever ``ppo.rollout_batch_size`` is.
        """
        size = self.ppo.rollout_batch_size
        per_rollout = self.ppo.epochs * math.ceil(size / (train.batch_size * world)) / train.grad_accum
        return max(1, math.ceil(train.epochs * len(self.prompts) / size * per_rollout))

    def sample(self, prompt_ids: list[list[int]], temperature: float, seed: int | list[int],
               width: int | None = None) -> list[list[int]]:
        """Continue prompts with the policy; each response keeps its end token (end of turn or EOS) if it stopped."""
        return sample_completions(self.model.policy, prompt_ids, self.tokenizer.pad_token_id,
                                  self.ppo.max_new_tokens, temperature, seed, self.stops, width=width)

    def score(self, indices: list[int], responses: list[list[int]]) -> torch.Tensor:
        """Raw scores (B,) of the responses, end token stripped (as reward models are trained)."""
        bare = [r[:-1] if r and r[-1] in self.stops else r for r in responses]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in bare]
        return self.scorer([self.prompts[i][0] for i in indices], texts, [self.prompts[i][2] for i in indices],
                           bare).float()

    def _roll_out(self, picked: list[int], rows: list[int], base: int) -> dict[str, torch.Tensor]:
        """Sample, score and measure ``rows`` (positions in ``picked``): one rank's share of the rollout."""
        ppo = self.ppo
        indices = [picked[j] for j in rows]
        prompt_ids = [self.prompts[i][1] for i in indices]
        width = max(len(self.prompts[i][1]) for i in picked)
        responses = self.sample(prompt_ids, ppo.temperature, row_seeds(base, rows), width)
        has_eos = torch.tensor([bool(r) and r[-1] in self.stops for r in responses])  # (B,): stopped by itself
        raw = self.score(indices, responses)  # (B,)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in layout(prompt_ids, responses, self.tokenizer.pad_token_id).items()}
        logp, hidden = response_logprobs(self.model.policy, batch, ppo.temperature)  # (B, R), (B, R, H)
        values = self.model.value_head(hidden).squeeze(-1)  # (B, R)
        with self.reference.model(device) as ref:
            ref_logp, _ = response_logprobs(ref, batch, ppo.temperature)  # (B, R)
        mask = batch["response_mask"]
        return {**batch, "old_logprobs": logp * mask, "old_values": values * mask, "ref_logprobs": ref_logp * mask,
                "raw": raw.to(device), "has_eos": has_eos.to(device)}

    @torch.no_grad()
    def refill(self, ddp: Dist | None = None) -> None:
        """Roll out the next prompts: under torchrun each rank samples its share, then all gather the rollout.

        Every row samples with its own seed (``row_seeds``) and the advantages are whitened over
        the whole gathered rollout, so the micro-batches are one process's.
        """
        ppo, seed = self.ppo, self.seed
        picked = prompt_indices(self.count, ppo.rollout_batch_size, len(self.prompts), seed)
        base = seed * 1_000_003 + self.count
        mine = shard(list(range(len(picked))), ddp)
        local = self._roll_out(picked, mine, base) if mine else {}
        r = gather_rows(local, ddp, {"input_ids": self.tokenizer.pad_token_id})
        raw, has_eos, mask = r.pop("raw"), r.pop("has_eos"), r["response_mask"]
        scores = raw - ppo.missing_eos_penalty * (~has_eos).float()  # (B,)
        rewards, kl = per_token_rewards(scores, r["old_logprobs"], r.pop("ref_logprobs"), mask, ppo.kl_coef)
        advantages, returns = gae(rewards, r["old_values"], mask, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, mask)  # over the whole rollout, every rank's rows

        kl_per_seq = kl.sum(1)  # (B,)
        self.stats = {"score": raw.mean().item(), "kl": kl_per_seq.mean().item(),
                      "non_score_reward": (-ppo.kl_coef * kl_per_seq).mean().item(),
                      "total_reward": (scores - ppo.kl_coef * kl_per_seq).mean().item(),
                      "response_length": mask.sum(1).float().mean().item(),
                      "eos_fraction": has_eos.float().mean().item()}
        rollout = {**r, "advantages": advantages, "returns": returns}
        g = torch.Generator().manual_seed(base)
        for micro in rank_micro_batches(rollout, ppo.epochs, self.batch_size, g, ddp):
            micro["num_loss_tokens"] = int(micro["response_mask"].sum())
            self.buffer.append(micro)
        self.count += 1
        penalty = f", so ppo.missing_eos_penalty={ppo.missing_eos_penalty:g} lowered their scores" \
            if ppo.missing_eos_penalty else ""
        self.warn_once(unfinished_warning(1 - self.stats["eos_fraction"], f"ppo.max_new_tokens={ppo.max_new_tokens}",
                                          penalty))


def layout(prompt_ids: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows and where each response token sits in them.

    Returns:
        ``input_ids``, ``attention_mask`` (B, T); ``response_ids``, ``response_mask`` (B, R);
        ``response_index`` (B, R): the position whose hidden state predicts response token j.
    """
    rows = [p + r for p, r in zip(prompt_ids, responses, strict=True)]
    ids, attention = pad_rows(rows, pad_id)  # (B, T)
    response_ids, response_mask = pad_rows(responses, 0, min_width=1)  # (B, R)
    starts = torch.tensor([[len(p) - 1] for p in prompt_ids])  # (B, 1): predicts the first response token
    index = (starts + torch.arange(response_ids.shape[1])).clamp(max=ids.shape[1] - 1)  # (B, R)
    return {"input_ids": ids, "attention_mask": attention, "response_ids": response_ids,
            "response_mask": response_mask.float(), "response_index": index}


def load_prompts(ctx: RunContext, key: str) -> list[tuple[str, list[int], list[int]]] | None:
    """(text, ids the policy continues, ids a reward model scores) of each prompt in the file under ``key``.

    Chat prompts are scored as their rendering; string prompts as BOS + text, as reward pairs are encoded.
    """
    prompts = shared.load_prompts(ctx, key, "PPO")
    if prompts is None:
        return None
    tok = ctx.tokenizer
    return [(p.value if isinstance(p.value, str) else tok.decode(p.ids, skip_special_tokens=True), p.ids,
             p.scored_ids) for p in prompts]


def build_task(ctx: RunContext) -> Task:
    """PPO task: rollouts feed micro-batches; the loss is clipped policy + value loss per token."""
    cfg, ppo = ctx.cfg, ctx.cfg.ppo
    if bool(ppo.reward_model) == bool(ppo.reward_fn):
        raise InputError("objective=ppo needs exactly one reward source: ppo.reward_model=<folder written by "
                         "objective=reward> or ppo.reward_fn=<module:function>")
    prompts, eval_prompts = load_prompts(ctx, "data.train"), load_prompts(ctx, "data.eval")
    if ppo.reward_fn:
        scorer = function_scorer(ppo.reward_fn)
    else:
        scorer = model_scorer(ppo.reward_model, ctx.tokenizer, cfg.trust_remote_code)
    model = ctx.load_causal_lm()
    disable_dropout(model)
    prepared = ctx.apply_method(model)
    wrapper = PolicyWithValue(prepared.model)
    batch_size, seed = cfg.train.batch_size, cfg.train.seed
    rollouts = Rollouts(wrapper, Reference(prepared.model, ctx.method.adapter), scorer, prompts, ctx.tokenizer,
                        ppo, batch_size, seed, warn=ctx.log.say)
    clip, clip_v, vf_coef, temperature = ppo.clip_range, ppo.clip_range_value, ppo.vf_coef, ppo.temperature

    def loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logp, hidden = response_logprobs(model.policy, batch, temperature)  # (B, R), (B, R, H)
        values = model.value_head(hidden).squeeze(-1)  # (B, R)
        mask = batch["response_mask"]
        pg, pg_metrics = policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask, clip)
        vf, vf_metrics = value_loss(values, batch["old_values"], batch["returns"], mask, clip_v)
        metrics = {**rollouts.stats, "policy_loss": pg.item(), "value_loss": vf.item(), **pg_metrics, **vf_metrics}
        return (pg + vf_coef * vf) * batch["num_loss_tokens"], metrics  # the loop divides by the window's tokens

    evaluators = {}
    if eval_prompts:
        def eval_score(model: Any) -> float:
            """Mean score of greedy responses to the held-out prompts (no EOS penalty)."""
            held_out = Rollouts(model, rollouts.reference, scorer, eval_prompts, ctx.tokenizer, ppo, batch_size, seed)
            indices = list(range(len(eval_prompts)))
            responses = held_out.sample([p[1] for p in eval_prompts], 0.0, seed)
            return held_out.score(indices, responses).mean().item()
        evaluators["eval_score"] = eval_score

    return Task(model=wrapper, batches=rollouts, loss=loss, save=prepared.save, evaluators=evaluators,
                summary={"ppo": dataclasses.asdict(ppo), **prepared.summary})
