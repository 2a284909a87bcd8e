"""Ollama out: a ``Modelfile`` next to the GGUF, with the chat template in Ollama's Go-template form.

Ollama does not run Jinja: its ``TEMPLATE`` is a Go ``text/template`` over ``.Messages``. A Jinja
template cannot be translated in general, so lmtune recognises the family it is in by rendering
it and comparing the text: a template that renders probe conversations exactly as ChatML does
(optionally after BOS, optionally adding a default system turn when the conversation has none,
as SmolLM2's and Qwen's do) becomes the ChatML Go template below, the default system prompt
becomes ``SYSTEM``, and generation stops at ``<|im_end|>``. Any other template is a clear error
rather than a Modelfile that would prompt the model in a format it was not trained on.
"""

from __future__ import annotations

from typing import Any

from lmtune.errors import InputError

# Go text/template for ChatML; the trailing newline after each turn and the open assistant turn
# at the end match `apply_chat_template(..., add_generation_prompt=True)`.
CHATML_GO = (
    "{{- range $i, $m := .Messages }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n{{ end -}}\n"
    "<|im_start|>assistant\n"
)
_PROBES = ("lmtune-probe-system", "lmtune-probe-user-1", "lmtune-probe-answer", "lmtune-probe-user-2")


def _chatml(messages: list[dict[str, str]], generation: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation else "")


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # jinja2's errors, or the template's own raise_exception
        raise InputError(f"the chat template failed to render a probe conversation ({e}); cannot translate it "
                         "for Ollama") from None


def chatml_parts(tokenizer: Any, template: str) -> tuple[str, str | None]:
    """``(text before the first turn (BOS or ""), default system prompt or None)`` of a ChatML ``template``.

    Raises:
        InputError: the template is not ChatML (renders any probe differently).
    """
    system, user, answer, user2 = _PROBES
    full = [{"role": "system", "content": system}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer}, {"role": "user", "content": user2}]
    bos = tokenizer.bos_token or ""
    rendered = _render(tokenizer, template, full)
    lead = bos if bos and rendered.startswith(bos) and not _chatml(full, True).startswith(bos) else ""
    if rendered != lead + _chatml(full, True):
        raise InputError("the chat template is not ChatML (<|im_start|>role ... <|im_end|>), the one family lmtune "
                         "translates to Ollama's Go template; export with --format gguf and write the Modelfile's "
                         f"TEMPLATE by hand. It renders a probe conversation as: {rendered[:200]!r}")
    bare = _render(tokenizer, template, full[1:])
    if bare == lead + _chatml(full[1:], True):
        return lead, None
    head, tail = lead + "<|im_start|>system\n", "<|im_end|>\n" + _chatml(full[1:], True)
    if bare.startswith(head) and bare.endswith(tail) and len(bare) >= len(head) + len(tail):
        return lead, bare[len(head):len(bare) - len(tail)]
    raise InputError("the chat template renders a conversation without a system turn in a way that is not ChatML; "
                     f"cannot translate it for Ollama: {bare[:200]!r}")


def _quote(text: str) -> str:
    if '"""' in text:
        raise InputError('the default system prompt contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer: Any, template: str | None) -> str:
    """The ``Modelfile`` text for a GGUF named ``gguf_name`` in the same folder.

    Raises:
        InputError: no chat template (Ollama's chat API needs one) or one that is not ChatML.
    """
    if not template:
        raise InputError("the model has no chat template, so Ollama's chat API could not prompt it; train it on "
                         "chat data (or set data.chat_template) first, or export with --format gguf")
    lead, system = chatml_parts(tokenizer, template)
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quote(lead + CHATML_GO)}"]
    if system is not None:
        lines.append(f"SYSTEM {_quote(system)}")
    stops = ["<|im_end|>", "<|im_start|>"]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
