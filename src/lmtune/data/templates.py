"""``data.chat_template``: which chat template instruction data is rendered with, if any.

- ``auto`` (default): the tokenizer's own template when it has one, for every instruction format
  (prompt/completion and Alpaca records become one user turn and one assistant turn). Without
  one, prompt/completion data stays raw text; chat (``messages``) data gets the template of the
  family whose special tokens the tokenizer already has (ChatML, Llama 3, Gemma, Phi-3), else
  ChatML with its two tokens added (``lmtune.data.chat.ensure_chat_template``).
- ``none``: raw text (BOS + prompt, completion + EOS); chat data cannot be raw and is refused.
- a name (``chatml``, ``llama3``, ``gemma``, ``phi3``): that template, when the tokenizer has its
  special tokens (nothing is added, so no embedding row must be learnt from scratch).
- a path to a ``.jinja`` file: that template, rendered in lmtune's bounded sandbox.

The chosen template is stored on the tokenizer, so the saved model (or adapter) carries it and
``lmtune generate --chat`` and ``lmtune eval`` render prompts exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.config import NAMED_CHAT_TEMPLATES
from lmtune.data.chat import CHATML_TEMPLATE, IM_END, IM_START, ensure_chat_template, has_chat_template, render
from lmtune.errors import InputError

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma has no system role: a system turn is prepended to the first user turn, as Gemma's own template does.
_GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set lead = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set lead = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (lead if loop.first else '') + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# name -> (template, the special tokens it writes, which the tokenizer must already have)
NAMED: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML_TEMPLATE, (IM_START, IM_END)),
    "llama3": (_LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": (_GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "phi3": (_PHI3, ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>")),
}
assert tuple(NAMED) == NAMED_CHAT_TEMPLATES  # config validates names without importing this layer

_PROBE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@dataclass(frozen=True)
class ChatChoice:
    """What ``apply_chat_setting`` decided: whether prompt/completion data is templated, and why."""

    templated: bool  # prompt/completion and Alpaca records are rendered as a user and an assistant turn
    source: str  # for the log: "the tokenizer's own", "llama3 (detected from its special tokens)", ...
    added: tuple[str, ...] = ()  # tokens added to the vocabulary (ChatML fallback): embeddings must grow


def missing_tokens(tokenizer: Any, name: str) -> list[str]:
    """The special tokens of named template ``name`` that the tokenizer's vocabulary lacks."""
    vocab = tokenizer.get_vocab()
    return [t for t in NAMED[name][1] if t not in vocab]


def detect_family(tokenizer: Any) -> str | None:
    """The first named template whose special tokens the tokenizer already has (``None``: none does)."""
    return next((name for name in NAMED if not missing_tokens(tokenizer, name)), None)


def read_template_file(path: str) -> str:
    """The text of a ``.jinja`` chat template file.

    Raises:
        InputError: the file is missing or not UTF-8 text.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"data.chat_template={path}: no such file; give the path of a .jinja chat template, "
                         f"or one of auto, none, {', '.join(NAMED)}")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"data.chat_template={path}: cannot read the template: {e}") from None


def apply_chat_setting(tokenizer: Any, setting: str, fmt: str, may_add_tokens: bool = True) -> ChatChoice:
    """Set the tokenizer's chat template from ``data.chat_template`` for data of format ``fmt``.

    Args:
        tokenizer: the run's tokenizer; its ``chat_template`` may be replaced (and, for chat data
            with no usable template, ChatML's tokens added).
        setting: ``auto``, ``none``, a name of ``NAMED``, or a path to a ``.jinja`` file.
        fmt: the resolved data format (``prompt_completion``, ``alpaca``, ``messages``, ...).
        may_add_tokens: whether ChatML's tokens may be added (PPO and GRPO do not resize the
            embeddings: for them chat data without a usable template stays untemplated, and is refused).

    Raises:
        InputError: an unknown name, a missing file, a named template whose tokens the tokenizer
            lacks, a template that does not render a conversation, or ``none`` with chat data.
    """
    chat_data = fmt == "messages"
    if setting == "none":
        if chat_data:
            raise InputError("data.chat_template=none trains on raw text, but the data holds chat turns "
                             "(data.format=messages, or chat-message prompts), which only a chat template can "
                             "render; set data.chat_template=auto (or a template name or .jinja file), or convert "
                             "the data to prompt/completion records")
        return ChatChoice(False, "none: raw text")
    if setting == "auto":
        if has_chat_template(tokenizer):
            return ChatChoice(True, "the tokenizer's own")
        if not chat_data:
            return ChatChoice(False, "none: the tokenizer has no chat template")
        family = detect_family(tokenizer)
        if family is not None:
            tokenizer.chat_template = NAMED[family][0]
            return ChatChoice(True, f"{family} (detected from the tokenizer's special tokens)")
        if not may_add_tokens:  # the caller refuses chat data it cannot render, naming the row
            return ChatChoice(False, "none: the tokenizer has no chat template")
        added = ensure_chat_template(tokenizer)
        return ChatChoice(True, "chatml (added: the tokenizer has no chat template)", tuple(added))
    if setting.endswith(".jinja"):
        template, source = read_template_file(setting), f"the file {setting}"
    elif setting in NAMED:
        lacking = missing_tokens(tokenizer, setting)
        if lacking:
            have = detect_family(tokenizer)
            fix = (f"use data.chat_template={have}, whose tokens it has" if have else
                   "use data.chat_template=auto (lmtune adds ChatML's tokens for chat data) or a .jinja template "
                   "written in tokens the tokenizer has")
            raise InputError(f"data.chat_template={setting} writes {', '.join(lacking)}, which the tokenizer does "
                             f"not have as tokens (they would be split into pieces the model never saw as "
                             f"markers); {fix}")
        template, source = NAMED[setting][0], setting
    else:
        raise InputError(f"data.chat_template={setting!r} is not a known template; use auto, none, "
                         f"{', '.join(NAMED)}, or a path to a .jinja file")
    tokenizer.chat_template = template
    render(tokenizer, _PROBE, False, f"data.chat_template={setting}")  # fails here, not at row 1000
    return ChatChoice(True, source)


def adopt_saved_template(tokenizer: Any, folder: str | Path | None) -> None:
    """Give a template-less tokenizer the chat template saved in ``folder`` (an adapter's), if any.

    An adapter trained with ``data.chat_template=NAME|FILE`` on a base without a template saves
    the tokenizer with that template; the base's tokenizer does not have it, and evaluating
    without it would score prompts the adapter never saw.
    """
    if folder is None or has_chat_template(tokenizer):
        return
    folder = Path(folder)
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        import json

        saved = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        template = saved if isinstance(saved, str) else None
    if template:
        tokenizer.chat_template = template
