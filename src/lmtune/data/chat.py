"""Chat templates: conversations -> token ids with the assistant turns marked for the loss.

A tokenizer's own ``chat_template`` is used when it has one. When it has none, lmtune gives it
ChatML (``<|im_start|>role\\n…<|im_end|>\\n``): ``<|im_start|>`` and ``<|im_end|>`` are added as
special tokens, and so are the role names if the vocabulary cannot spell them (the shipped
word-level tokenizer cannot). The template is stored on the tokenizer, so a saved model carries
it and ``lmtune generate --chat`` renders prompts exactly as training did.

Where the assistant's turns begin and end is found from token ids, not by tokenizing the whole
conversation and searching for strings: for each assistant turn the template is rendered without
it (with the generation prompt) and with it; the text the turn adds is tokenized on its own and
labelled, everything between turns is tokenized on its own and masked. No token can straddle a
boundary, and the prompt part is tokenized the way ``render_generation_prompt`` tokenizes it.
"""

from __future__ import annotations

from typing import Any

from lmtune.data.examples import BuildStats, encode, special_ids
from lmtune.data.formats import DROP_EMPTY, finish_example
from lmtune.data.template_sandbox import TemplateLimit, bounded_rendering
from lmtune.errors import InputError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant")
_PROBE = "lmtune-probe-reply"

# ChatML, starting with BOS when the tokenizer has one (the shipped model was pre-trained with
# BOS opening every sequence).
CHATML_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer brings its own chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def ensure_chat_template(tokenizer: Any) -> list[str]:
    """Give a tokenizer without a chat template ChatML, adding the tokens ChatML needs.

    Returns:
        The tokens added to the vocabulary (empty when the tokenizer had a template or already
        had the tokens); the caller must resize the model's embeddings to ``len(tokenizer)``.
    """
    if has_chat_template(tokenizer):
        return []
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    wanted = [t for t in (IM_START, IM_END) if t not in vocab]
    wanted += [r for r in CHAT_ROLES if r not in vocab and not _can_spell(tokenizer, r)]
    if wanted:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in wanted], special_tokens=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    return wanted


def _can_spell(tokenizer: Any, word: str) -> bool:
    """Whether ``word`` encodes to known tokens that decode back to it."""
    try:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    except Exception:  # a word-level tokenizer without an unknown token raises on new words
        return False
    unk = getattr(tokenizer, "unk_token_id", None)
    return bool(ids) and unk not in ids and tokenizer.decode(ids).strip() == word


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token, including added ones such as ``<|im_end|>`` (not the unknown token)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return ids


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
    """The chat template's text for ``messages``; a template error names the row.

    Rendering is bounded in time and size (see ``lmtune.data.template_sandbox``).

    Raises:
        InputError: the tokenizer has no chat template, or the template raised, is not valid Jinja,
            or went over a bound; the message names the template and says why.
    """
    if not has_chat_template(tokenizer):
        raise InputError(f"{where}: the record is given as chat messages but the tokenizer has no chat template; "
                         "give the texts as strings, or use a model whose tokenizer has one")
    name = f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"
    try:
        with bounded_rendering():
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateLimit as e:
        raise InputError(f"{where}: {name} was stopped: {e}; a chat template from an untrusted source may be "
                         "built to hang or fill memory — use a template you have read") from None
    except Exception as e:  # jinja2 TemplateError or SecurityError, or whatever the template's raise_exception raises
        why = str(e).strip() or "it gave no reason"
        raise InputError(f"{where}: {name} refused to render this conversation ({type(e).__name__}: {why})") from None
    if not isinstance(text, str):  # a template can only make text, but be sure before slicing it
        raise InputError(f"{where}: {name} rendered {type(text).__name__}, not text")
    return text


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn marker, and EOS."""
    _, eos = special_ids(tokenizer)
    stops = []
    if has_chat_template(tokenizer):
        # Only the text the template writes *after* the reply is tokenized, so the probe's
        # content need not be in the vocabulary.
        probe = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE}]
        try:
            full = render(tokenizer, probe, False, "chat template")
            after = full[full.rindex(_PROBE) + len(_PROBE):]
            tail = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        except Exception:  # a template that rejects the probe: fall back to EOS alone
            tail = []
        specials = special_token_ids(tokenizer)
        stops = [i for i in tail if i in specials][:1]
    if eos is not None and eos not in stops:
        stops.append(eos)
    return stops


def conversation_ids(tokenizer: Any, messages: list[dict[str, str]],
                     where: str = "conversation") -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it belongs to an assistant turn.

    Each assistant turn is trained up to and including its end-of-turn token; what the template
    writes after that (ChatML's newline) is masked. A template that writes no special token at
    the end of an assistant turn gets EOS appended to the turn, so the model still learns to stop.

    Raises:
        InputError: the template fails to render, renders a turn so that the earlier text changes
            (no prefix to split at), or the tokenizer cannot encode the text.
    """
    specials = special_token_ids(tokenizer)
    _, eos = special_ids(tokenizer)
    if messages and messages[0]["role"] == "assistant":
        raise InputError(f"{where}: the conversation starts with an assistant turn; an assistant turn answers a "
                         "user (or system) turn, so put the user's message before it or drop the leading turn")
    ids: list[int] = []
    trained: list[bool] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:k], True, where)
        full = render(tokenizer, messages[:k + 1], False, where)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InputError(f"{where}: the chat template renders earlier turns differently once turn {k} is added, "
                             "so the response cannot be separated from the prompt; use a template whose "
                             "renderings of a conversation's prefixes are prefixes of each other")
        context = encode(tokenizer, prompt[len(done):], f"prompt before turn {k}", where)
        reply = encode(tokenizer, full[len(prompt):], f"assistant turn {k}", where)
        marks = [i for i, t in enumerate(reply) if t in specials and i > 0]
        if marks:
            n_trained = marks[-1] + 1  # up to and including the end-of-turn token
        else:
            reply, n_trained = reply + [eos], len(reply) + 1
        ids += context + reply
        trained += [False] * len(context) + [True] * n_trained + [False] * (len(reply) - n_trained)
        done = full
    return ids, trained


def chat_example_ids(tokenizer: Any, messages: list[dict[str, str]], max_length: int, stats: BuildStats,
                     loss_on: str = "response", where: str = "conversation") -> dict[str, list[int]] | None:
    """One token example from a conversation; every assistant turn carries loss.

    The chat twin of ``lmtune.data.formats.prompt_completion_ids``. Preference tuning calls it
    with the shared prompt turns plus the chosen (or rejected) assistant turn.

    Args:
        tokenizer: a tokenizer with a chat template (see ``ensure_chat_template``).
        messages: ``[{"role", "content"}, ...]`` ending with an assistant turn.
        max_length: longer examples keep their start and are counted as truncated.
        stats: receives ``examples``, ``truncated`` and drop counts.
        loss_on: ``response`` (assistant turns only) or ``all``.
        where: the row, for error messages.

    Returns:
        ``{"input_ids", "labels"}``, or ``None`` (counted) when an assistant turn is empty or
        ``max_length`` cuts off every assistant token.
    """
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        stats.drop(DROP_EMPTY)
        return None
    if special_ids(tokenizer)[1] is None:
        raise InputError("the tokenizer has no EOS (or BOS) token, so the model could not learn to stop")
    ids, trained = conversation_ids(tokenizer, messages, where)
    return finish_example(ids, trained, max_length, stats, loss_on)


def prompt_ids(tokenizer: Any, text: str, templated: bool, where: str) -> list[int]:
    """One prompt's ids as the model is asked it: a user turn plus the generation prompt of the
    chat template (``templated``), else BOS + the raw text (how raw prompts are trained).

    Raises:
        InputError: the text cannot be encoded or the template fails, naming ``where``.
    """
    if templated:
        return encode(tokenizer, render(tokenizer, [{"role": "user", "content": text}], True, where), "prompt", where)
    bos = special_ids(tokenizer)[0]
    return ([bos] if bos is not None else []) + encode(tokenizer, text, "prompt", where)


def render_generation_prompt(tokenizer: Any, prompt: str) -> tuple[str, list[int]]:
    """The chat-templated text for a single user ``prompt``, and the ids that end the reply.

    Used by ``lmtune generate --chat``: the text is tokenized without adding special tokens
    (the template writes its own), and generation stops at the end-of-turn token or EOS.

    Raises:
        InputError: the tokenizer has no chat template and no ChatML tokens (the model was
            never tuned on chat data), or the template fails to render.
    """
    if not has_chat_template(tokenizer):
        vocab = tokenizer.get_vocab()
        if IM_START not in vocab or IM_END not in vocab:
            raise InputError("this model's tokenizer has no chat template and no ChatML tokens, so it was not "
                             "tuned on chat data; leave out --chat, or fine-tune it on messages data first")
        tokenizer.chat_template = CHATML_TEMPLATE
    text = render(tokenizer, [{"role": "user", "content": prompt}], True, "--prompt")
    return text, end_of_turn_ids(tokenizer)
