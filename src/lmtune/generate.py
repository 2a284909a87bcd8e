"""Token sampling and autoregressive generation for causal language models.

Works on `transformers` causal LMs (using their KV cache) and on any `nn.Module`
whose forward takes `input_ids` and returns logits, recomputing the whole
sequence each step when the model offers no cache.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lmtune.data.chat import render_generation_prompt
from lmtune.data.examples import encode
from lmtune.errors import InputError


def _check_options(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
    seed: int | None = None,
) -> None:
    if max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}.")
    # NaN passes every comparison, so it is refused by name; inf would divide logits to 0.
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(
            f"--temperature must be 0 (greedy) or a finite positive number, got {temperature}."
        )
    if seed is not None and not 0 <= seed < 2**64:
        raise InputError(f"--seed must be in [0, 2**64) (torch's generator seed), got {seed}.")
    if top_k is not None and top_k <= 0:
        raise InputError(f"--top-k must be a positive integer, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {top_p}.")


def sample_next(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token for each row from its logits.

    Args:
        logits: Next-token logits, shape (B, V).
        temperature: 0 (or below) for greedy argmax; otherwise logits are divided
            by it before sampling.
        top_k: Keep only the k most likely tokens (None: no limit).
        top_p: Keep the smallest set of most likely tokens whose cumulative
            probability reaches p, always at least one (None: no limit).
        generator: Random generator for reproducible sampling.

    Returns:
        Token ids, shape (B,).

    Raises:
        InputError: If top_k or top_p is out of range.
    """
    _check_options(0, max(temperature, 0.0), top_k, top_p)
    if temperature <= 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        # Scatter the k largest into a -inf canvas so that ties at the k-th value
        # cannot widen the kept set beyond k.
        values, indices = logits.topk(top_k, dim=-1)  # (B, k)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)  # (B, V)
        # A token is dropped when the tokens ranked above it already reach p, so
        # the most likely token is always kept.
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
        drop_sorted = mass_before >= top_p  # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


class _Forward:
    """Calls a model with the keyword arguments its forward accepts.

    Models whose forward only takes `**kwargs` (wrappers) are tried once with the
    full set; if that raises TypeError or returns no cache, later calls fall back.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.by_keyword = "input_ids" in params
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.explicit_mask = "attention_mask" in params
        self.pass_mask = self.explicit_mask or var_kw
        self.pass_positions = "position_ids" in params or var_kw
        self.pass_keep = "logits_to_keep" in params or var_kw
        self.cache = ("past_key_values" in params and "use_cache" in params) or var_kw
        self.tentative = var_kw
        self.calls = 0

    def __call__(
        self, ids: Tensor, mask: Tensor, positions: Tensor, past: Any
    ) -> tuple[Tensor, Any]:
        """Run one step; returns the last position's logits (B, V) and the cache."""
        try:
            out = self._run(ids, mask, positions, past)
        except TypeError:
            if not (self.tentative and self.calls == 0):
                raise
            # The wrapper's inner model rejected an optional argument: use the
            # plain interface from now on.
            self.pass_mask = self.explicit_mask
            self.pass_positions = self.pass_keep = self.cache = False
            out = self._run(ids, mask, positions, past)
        self.calls += 1
        if isinstance(out, Tensor):
            logits = out
        elif hasattr(out, "logits"):
            logits = out.logits
        else:
            logits = out[0]
        new_past = getattr(out, "past_key_values", None) if self.cache else None
        if self.cache and new_past is None:
            self.cache = False
        return logits[:, -1, :], new_past  # (B, V)

    def _run(self, ids: Tensor, mask: Tensor, positions: Tensor, past: Any) -> Any:
        kwargs: dict[str, Any] = {}
        if self.pass_mask:
            kwargs["attention_mask"] = mask
        if self.pass_positions:
            kwargs["position_ids"] = positions
        if self.pass_keep:
            kwargs["logits_to_keep"] = 1
        if self.cache:
            kwargs["use_cache"] = True
            kwargs["past_key_values"] = past
        if self.by_keyword:
            return self.model(input_ids=ids, **kwargs)
        return self.model(ids, **kwargs)


def max_context(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (``None`` when it states none)."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _as_batch(input_ids: list[int] | list[list[int]] | Tensor) -> Tensor:
    if isinstance(input_ids, Tensor):
        ids = input_ids.long()
    else:
        try:
            ids = torch.tensor(input_ids, dtype=torch.long)
        except (ValueError, TypeError) as err:
            raise InputError(
                "the prompts must be token id lists of equal length; pad them and "
                "pass an attention_mask"
            ) from err
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)  # (1, T)
    if ids.dim() != 2:
        raise InputError(f"input_ids must be 1-D or 2-D, got shape {tuple(ids.shape)}.")
    if ids.shape[1] == 0:
        raise InputError("the prompt is empty; give at least one token.")
    return ids  # (B, T)


def generate(
    model: nn.Module,
    input_ids: list[int] | list[list[int]] | Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | list[int] | None = None,
    stop_ids: Iterable[int] = (),
    attention_mask: Tensor | None = None,
) -> list[list[int]]:
    """Continue one or more prompts token by token.

    Args:
        model: A causal LM; its forward takes `input_ids` and returns an object
            with `.logits` or a logits tensor (B, T, V).
        input_ids: One prompt (list of ids or 1-D tensor) or a batch of prompts of
            equal length (2-D tensor or list of lists), left-padded if needed.
        max_new_tokens: Most tokens to add per row.
        temperature: 0 for greedy decoding, otherwise the sampling temperature.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only within the nucleus of cumulative probability p.
        seed: Seed for sampling; the same seed gives the same output. A list gives each row
            its own seed (and generator): a row's tokens then do not depend on the other rows
            of the batch, so a batch split across processes samples what one process would.
        stop_ids: Token ids that end a row; the stop id is kept in the output.
        attention_mask: (B, T) mask with 0 on padding; defaults to all ones.

    Returns:
        The new token ids of each row (prompt excluded).

    Raises:
        InputError: For invalid options, malformed prompts, or a prompt longer
            than the model's context.
    """
    seeds = seed if isinstance(seed, list) else [seed]
    for one in seeds:
        _check_options(max_new_tokens, temperature, top_k, top_p, one)
    ids = _as_batch(input_ids)  # (B, T)
    if isinstance(seed, list) and len(seed) != ids.shape[0]:
        raise InputError(f"seed is a list of {len(seed)} seeds for {ids.shape[0]} prompts; give one per prompt.")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ids = ids.to(device)
    if attention_mask is None:
        mask = torch.ones_like(ids)  # (B, T)
    else:
        mask = torch.as_tensor(attention_mask).to(device=device, dtype=torch.long)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)  # (1, T)
        if mask.shape != ids.shape:
            raise InputError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids has "
                f"shape {tuple(ids.shape)}; they must match."
            )
    prompt_len = ids.shape[1]
    steps = max_new_tokens
    context = max_context(model)
    if context is not None:
        if prompt_len > context:
            raise InputError(
                f"the prompt has {prompt_len} tokens but the model's context is "
                f"{context}; shorten the prompt."
            )
        steps = min(steps, context - prompt_len)

    forward = _Forward(model)
    if not forward.pass_mask and bool((mask == 0).any()):
        raise InputError(
            "the model's forward takes no attention_mask, so padded prompts cannot "
            "be generated from; pass prompts of equal length without padding."
        )
    generator = None
    if isinstance(seed, list):
        rows = [torch.Generator(device=device).manual_seed(s) for s in seed]

        def pick(logits: Tensor) -> Tensor:  # each row draws from its own generator
            return torch.cat([sample_next(logits[i:i + 1], temperature, top_k, top_p, g)
                              for i, g in enumerate(rows)])  # (B,)
    else:
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)

        def pick(logits: Tensor) -> Tensor:
            return sample_next(logits, temperature, top_k, top_p, generator)  # (B,)

    was_training = model.training
    model.eval()
    try:
        return _decode(forward, ids, mask, steps, pick, {int(s) for s in stop_ids})
    finally:
        model.train(was_training)


@torch.no_grad()
def _decode(
    forward: _Forward,
    ids: Tensor,
    mask: Tensor,
    steps: int,
    pick: Callable[[Tensor], Tensor],
    stops: set[int],
) -> list[list[int]]:
    """Run the token loop, feeding only the newest token once a cache exists."""
    batch = ids.shape[0]
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    # Positions count only real tokens so left-padded rows line up with unpadded ones.
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)
    past: Any = None
    step_ids, step_positions = ids, positions
    for step in range(steps):
        logits, past = forward(step_ids, mask, step_positions, past)  # (B, V)
        token = pick(logits)  # (B,)
        for row, tok in enumerate(token.tolist()):
            if not done[row]:
                new_tokens[row].append(tok)
                done[row] = tok in stops
        if all(done) or step == steps - 1:
            break
        ids = torch.cat([ids, token.unsqueeze(-1)], dim=-1)  # (B, T+1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)  # (B, T+1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=-1)  # (B, T+1)
        if forward.cache:
            step_ids, step_positions = ids[:, -1:], positions[:, -1:]  # (B, 1)
        else:
            step_ids, step_positions = ids, positions  # (B, T+1)
    return new_tokens


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
    add_bos: bool = True,
    chat: bool = False,
) -> str:
    """Continue a text prompt and return only the generated text.

    Args:
        model: A causal LM (see `generate`).
        tokenizer: A Hugging Face tokenizer matching the model.
        prompt: The text to continue.
        max_new_tokens: Most tokens to add.
        temperature: 0 for greedy decoding, otherwise the sampling temperature.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only within the nucleus of cumulative probability p.
        seed: Seed for sampling.
        stop_ids: Extra token ids that end generation, besides the EOS token.
        add_bos: Prepend the tokenizer's BOS token when it has one.
        chat: Treat ``prompt`` as one user turn: render it with the chat template
            (which writes its own special tokens, so no BOS is added) and stop at
            the end of the assistant's turn.

    Returns:
        The decoded continuation, special tokens removed.

    Raises:
        InputError: For invalid options, a prompt that does not fit the model, or
            ``chat`` with a tokenizer that has no chat template (nor ChatML tokens).
    """
    stops = set(stop_ids)
    if chat:
        prompt, turn_end = render_generation_prompt(tokenizer, prompt)
        stops.update(turn_end)
        add_bos = False
    # Special tokens are added by hand: some tokenizers would append EOS, which
    # would tell the model the text is already finished.
    ids = encode(tokenizer, prompt, "prompt", "--prompt")
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        stops.add(eos)
    new = generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_ids=stops,
    )[0]
    return tokenizer.decode(new, skip_special_tokens=True)
