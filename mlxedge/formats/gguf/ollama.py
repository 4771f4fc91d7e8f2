"""An Ollama Modelfile for a GGUF we wrote: FROM, stop parameters and, where we can translate the
model's chat template faithfully, a TEMPLATE (and the template's default SYSTEM prompt).

A Hugging Face chat template is Jinja; Ollama's is a Go template. Rather than translate Jinja, we
recognise a template family by what it renders: the model's own template is rendered (Jinja, as
transformers does) on probe conversations and compared with what each family we can express
renders. Only an exact match gets a TEMPLATE; anything else (a date in the system prompt, tool
markup, an unknown format) gets none, with a warning, and Ollama falls back to its own detection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class ChatFamily:
    """A chat format we can write as an Ollama template.

    Attributes:
        name: what the report calls it.
        render: the prompt this format gives a conversation (system message first, if any), up to
            and including the assistant's header.
        template: the same format as an Ollama (Go) template; `.System` is the system message
            (the Modelfile's SYSTEM when the conversation has none).
        stops: strings that end an assistant turn.
    """

    name: str
    render: Callable[[Conversation], str]
    template: str
    stops: tuple[str, ...]


def _chatml(conv: Conversation) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
    return turns + "<|im_start|>assistant\n"


def _llama3(conv: Conversation) -> str:
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    turns = "".join(head.format(m["role"]) + m["content"] + "<|eot_id|>" for m in conv)
    return turns + head.format("assistant")


def _gemma(conv: Conversation) -> str:
    # Gemma 3's template: a system message opens the first user turn; the assistant is "model".
    # (Gemma 2's refuses system messages, and otherwise renders the same.)
    system = conv[0]["content"] + "\n\n" if conv and conv[0]["role"] == "system" else ""
    turns = conv[1:] if system else conv
    out = []
    for i, m in enumerate(turns):
        role = "model" if m["role"] == "assistant" else m["role"]
        prefix = system if i == 0 else ""
        out.append(f"<start_of_turn>{role}\n{prefix}{m['content']}<end_of_turn>\n")
    return "".join(out) + "<start_of_turn>model\n"


def _phi3(conv: Conversation) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in conv) + "<|assistant|>\n"


FAMILIES = (
    ChatFamily(
        "ChatML",
        _chatml,
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        '{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
        "{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    ChatFamily(
        "Llama 3",
        _llama3,
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n"
        "{{ .System }}<|eot_id|>{{ end }}"
        '{{ range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}'
        "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatFamily(
        "Gemma",
        _gemma,
        '{{ $first := true }}{{ range .Messages }}{{ if ne .Role "system" }}<start_of_turn>'
        '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        "{{ if $first }}{{ if $.System }}{{ $.System }}\n\n{{ end }}{{ $first = false }}{{ end }}"
        "{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    ChatFamily(
        "Phi-3",
        _phi3,
        "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        '{{ range .Messages }}{{ if ne .Role "system" }}<|{{ .Role }}|>\n'
        "{{ .Content }}<|end|>\n{{ end }}{{ end }}<|assistant|>\n",
        ("<|end|>", "<|user|>", "<|assistant|>"),
    ),
)

# Probe conversations: with a system message and several turns, and without one (which shows a
# default system prompt the template inserts by itself).
_WITH_SYSTEM: Conversation = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
_WITHOUT_SYSTEM: Conversation = [{"role": "user", "content": "Name a colour."}]


def _token_text(value) -> str:
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return str(value or "")


def _jinja_render(template: str, conv: Conversation, tok_config: dict) -> str:
    """The prompt transformers would build (in this process: for tests and trusted templates)."""
    from .jinja_probe import render

    bos, eos = _token_text(tok_config.get("bos_token")), _token_text(tok_config.get("eos_token"))
    return render(template, [conv], bos, eos)[0]


@dataclass(frozen=True)
class Recognised:
    family: ChatFamily
    default_system: str | None


def recognise(template: str, tok_config: dict, adds_bos: bool) -> Recognised | None:
    """The family `template` renders exactly like, with its default system prompt, or None.

    `adds_bos`: the tokenizer puts BOS in front by itself, so a template's leading BOS is not part
    of what Ollama's template must write.
    """
    from .jinja_probe import render_bounded

    bos = _token_text(tok_config.get("bos_token"))
    eos = _token_text(tok_config.get("eos_token"))
    renders = render_bounded(template, [_WITH_SYSTEM, _WITHOUT_SYSTEM], bos, eos)
    probe = _WITH_SYSTEM
    if isinstance(renders, str):
        # Some templates refuse system messages (Gemma 2's): recognised on turns without one
        # (the family's template then puts a system prompt where its own format would).
        probe = _WITH_SYSTEM[1:]
        fallback = render_bounded(template, [probe, _WITHOUT_SYSTEM], bos, eos)
        if isinstance(fallback, str):  # a template that cannot render our probes is unknown
            log.warning("the chat template was not recognised: %s", renders)
            return None
        renders = fallback
    with_system, without = renders
    if adds_bos and bos and with_system.startswith(bos) and without.startswith(bos):
        with_system, without = with_system[len(bos) :], without[len(bos) :]
    for family in FAMILIES:
        if family.render(probe) != with_system:
            continue
        if family.render(_WITHOUT_SYSTEM) == without:
            return Recognised(family, None)
        # A default system prompt: the template renders as if the conversation had one.
        placeholder = family.render([{"role": "system", "content": "\0"}, *_WITHOUT_SYSTEM])
        before, _, after = placeholder.partition("\0")
        fits = len(without) > len(before) + len(after)
        if fits and without.startswith(before) and without.endswith(after):
            default = without[len(before) : len(without) - len(after)]
            if family.render([{"role": "system", "content": default}, *_WITHOUT_SYSTEM]) == without:
                return Recognised(family, default)
    return None


def _chat_template(tok_config: dict) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _quoted(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _triple(value: str) -> str:
    if '"""' in value:
        raise ValueError('cannot hold """')
    return f'"""{value}"""'


def modelfile_text(gguf_name: str, tok_config: dict, adds_bos: bool) -> tuple[str, list[str]]:
    """The Modelfile for GGUF file `gguf_name` (beside it), and warnings for the user."""
    warnings: list[str] = []
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    template = _chat_template(tok_config)
    found = recognise(template, tok_config, adds_bos) if template else None
    if found is not None and found.default_system and '"""' in found.default_system:
        found = None
    if found is not None:
        lines.append(f"TEMPLATE {_triple(found.family.template)}")
        if found.default_system:
            lines.append(f"SYSTEM {_triple(found.default_system)}")
        stops.extend(found.family.stops)
    elif template:
        warnings.append(
            "the chat template is not one the Modelfile can express faithfully (ChatML, "
            "Llama 3, Gemma and Phi-3 can be); no TEMPLATE was written, so Ollama will pick one "
            "itself"
        )
    else:
        warnings.append("the model has no chat template; no TEMPLATE was written")
    eos = _token_text(tok_config.get("eos_token"))
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    return "\n".join(lines) + "\n", warnings


def modelfile_path(gguf_path: Path) -> Path:
    """Where `write_modelfile` puts the Modelfile of a GGUF: `<stem>.Modelfile` beside it."""
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")
