"""The --ollama Modelfile, checked against Ollama's documented format (Ollama cannot run here).

Two checks stand in for Ollama itself:
- a parser of the Modelfile grammar (docs/modelfile.md: `# comment`, `INSTRUCTION arguments`,
  instructions case-insensitive, `\"\"\"` strings spanning lines, FROM required, known PARAMETERs);
- an interpreter of the Go-template subset our TEMPLATEs use (text/template: `{{ if }}`, `{{ ne }}`,
  `{{ range }}`, `{{ end }}`, fields), fed what Ollama feeds a template (`.System` = the
  conversation's system message or else the Modelfile's SYSTEM; `.Messages` = every message, system
  ones included). For a recognised template, what it renders must equal what the model's own
  Jinja template renders for the same conversations.
"""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from mlxedge.cli import main
from mlxedge.formats.gguf.ollama import _jinja_render, modelfile_text
from mlxedge.source import resolve

INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"}
PARAMETERS = {"num_ctx", "repeat_last_n", "repeat_penalty", "temperature", "seed", "stop",
              "num_predict", "top_k", "top_p", "min_p"}  # fmt: skip

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                 "chat_template": LLAMA3}  # fmt: skip
# Llama 3.1 puts dates into the system turn: not expressible, so no TEMPLATE.
LLAMA31_LIKE = LLAMA3.replace(
    "{% set loop_messages = messages %}",
    "{% set loop_messages = messages %}{{ '<|start_header_id|>system<|end_header_id|>\n\n"
    "Today Date: 26 Jul 2024<|eot_id|>' }}",
)
MISTRAL_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."},
     {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]  # fmt: skip


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs, per the documented grammar; raises on anything else."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        assert word.upper() in INSTRUCTIONS, f"unknown instruction {word!r}"
        rest = rest.strip()
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body:
                assert i < len(lines), "unterminated triple-quoted string"
                body += "\n" + lines[i]
                i += 1
            value, _, after = body.partition('"""')
            assert not after.strip(), "text after a closing triple quote"
            rest = value
        out.append((word.upper(), rest))
    assert [k for k, _ in out].count("FROM") == 1, "exactly one FROM"
    for key, arg in out:
        if key == "PARAMETER":
            name, _, value = arg.partition(" ")
            assert name in PARAMETERS, f"unknown parameter {name!r}"
            if value.startswith('"'):
                json.loads(value)  # a well-formed quoted string
    return out


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def go_render(template: str, data: dict) -> str:
    """Go text/template, the subset our templates use."""
    tokens, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim_next":
            tokens.pop()
            text = text.lstrip()
        tokens.append(("text", text))
        tokens.append(("action", m.group(2)))
        if m.group(3):
            tokens.append(("trim_next", ""))
        pos = m.end()
    tail = template[pos:]
    if tokens and tokens[-1][0] == "trim_next":
        tokens.pop()
        tail = tail.lstrip()
    tokens.append(("text", tail))

    def value(expr: str, dot):
        if expr.startswith("ne "):
            a, b = expr[3:].split(" ", 1)
            return value(a, dot) != json.loads(b)
        assert expr.startswith("."), expr
        return dot.get(expr[1:]) if isinstance(dot, dict) else None

    def run(i: int, dot, out: list[str]) -> int:
        while i < len(tokens):
            kind, body = tokens[i]
            if kind == "text":
                out.append(body)
            elif body.startswith("if "):
                sub: list[str] = []
                i = run(i + 1, dot, sub)
                if value(body[3:], dot):
                    out.extend(sub)
            elif body.startswith("range "):
                end = i
                for item in value(body[6:], dot) or []:
                    sub = []
                    end = run(i + 1, item, sub)
                    out.extend(sub)
                i = end if end != i else _skip(i + 1)
            elif body == "end":
                return i
            else:
                out.append(str(value(body, dot)))
            i += 1
        return i

    def _skip(i: int) -> int:
        depth = 0
        while True:
            kind, body = tokens[i]
            if kind == "action" and body.startswith(("if ", "range ")):
                depth += 1
            elif kind == "action" and body == "end":
                if depth == 0:
                    return i
                depth -= 1
            i += 1

    out: list[str] = []
    run(0, data, out)
    return "".join(out)


def ollama_prompt(modelfile: dict, messages: list[dict]) -> str:
    system = [m["content"] for m in messages if m["role"] == "system"]
    as_go = [{"Role": m["role"], "Content": m["content"]} for m in messages]  # api.Message fields
    data = {"System": system[0] if system else modelfile.get("SYSTEM"), "Messages": as_go}
    return go_render(modelfile["TEMPLATE"], data)


@pytest.mark.parametrize(
    "name, config, adds_bos",
    [("smollm2", None, False), ("llama3", LLAMA3_CONFIG, True)],
)
def test_recognised_templates_render_like_the_model_s_own(name, config, adds_bos):
    config = config or resolve("smollm2").tokenizer.config
    text, warnings = modelfile_text("m.gguf", config, adds_bos)
    assert not warnings
    parsed = dict(parse_modelfile(text))
    assert parsed["FROM"] == "./m.gguf"
    bos = config["bos_token"] if adds_bos else ""
    for conv in CONVERSATIONS:
        theirs = _jinja_render(config["chat_template"], conv, config)
        assert bos + ollama_prompt(parsed, conv) == theirs


def test_smollm2_modelfile_keeps_the_default_system_prompt_and_stops():
    text, _ = modelfile_text("m.gguf", resolve("smollm2").tokenizer.config, False)
    pairs = parse_modelfile(text)
    assert (
        "SYSTEM",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    ) in pairs
    stops = [json.loads(a.split(" ", 1)[1]) for k, a in pairs if k == "PARAMETER"]
    assert "<|im_end|>" in stops


@pytest.mark.parametrize("template", [LLAMA31_LIKE, MISTRAL_LIKE, "{{ raise_exception('no') }}"])
def test_unrecognised_templates_get_no_template_and_a_warning(template):
    config = {**LLAMA3_CONFIG, "chat_template": template}
    text, warnings = modelfile_text("m.gguf", config, True)
    pairs = parse_modelfile(text)
    assert "TEMPLATE" not in dict(pairs) and len(warnings) == 1
    assert ("PARAMETER", 'stop "<|eot_id|>"') in pairs  # the end-of-turn token still stops


def test_cli_writes_the_modelfile_beside_the_gguf(tmp_path):
    out = tmp_path / "s.gguf"
    args = ["export", "gguf", "smollm2", "--type", "Q8_0", "-o", str(out), "--ollama"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    modelfile = tmp_path / "s.Modelfile"
    assert dict(parse_modelfile(modelfile.read_text()))["FROM"] == "./s.gguf"
