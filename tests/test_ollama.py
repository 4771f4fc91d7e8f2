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

# Gemma 2 refuses system messages; Gemma 3 folds one into the first user turn.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "{%- set loop_messages = messages[1:] -%}\n{%- else -%}\n"
    '{%- set first_user_prefix = "" -%}\n{%- set loop_messages = messages -%}\n{%- endif -%}\n'
    "{%- for message in loop_messages -%}\n"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '{{ raise_exception("Conversation roles must alternate user/assistant/...") }}\n'
    "{%- endif -%}\n{%- if (message['role'] == 'assistant') -%}\n{%- set role = \"model\" -%}\n"
    "{%- else -%}\n{%- set role = message['role'] -%}\n{%- endif -%}\n"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "{%- if message['content'] is string -%}\n{{ message['content'] | trim }}\n{%- endif -%}\n"
    "{{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "{{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
GEMMA_CONFIG = {"bos_token": "<bos>", "eos_token": "<eos>"}
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_CONFIG = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "chat_template": PHI3}

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
    """Go text/template, the subset our templates use: text, fields (`.Role`, `$.System`),
    variables (`$v := x`, `$v = x`, shared with enclosed blocks as in Go), `eq` / `ne`, and
    `if` / `else` / `range` blocks, a block not taken never run."""
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

    def parse(i: int) -> tuple[list, int, str | None]:
        """The nodes from token i to the `end` / `else` that closes them."""
        nodes: list = []
        while i < len(tokens):
            kind, body = tokens[i]
            if kind == "text":
                nodes.append(("text", body))
            elif body.startswith("if "):
                then, i, closed = parse(i + 1)
                other: list = []
                if closed == "else":
                    other, i, closed = parse(i + 1)
                assert closed == "end", body
                nodes.append(("if", body[3:], then, other))
            elif body.startswith("range "):
                inner, i, closed = parse(i + 1)
                assert closed == "end", body
                nodes.append(("range", body[6:], inner))
            elif body in ("end", "else"):
                return nodes, i, body
            else:
                nodes.append(("action", body))
            i += 1
        return nodes, i, None

    variables: dict = {}

    def value(expr: str, dot):
        for op in ("eq ", "ne "):
            if expr.startswith(op):
                a, b = expr[3:].split(" ", 1)
                return (value(a, dot) == value(b, dot)) is (op == "eq ")
        if expr.startswith('"'):
            return json.loads(expr)
        if expr in ("true", "false"):
            return expr == "true"
        if expr.startswith("$."):
            return data.get(expr[2:])
        if expr.startswith("$"):
            return variables[expr[1:]]
        assert expr.startswith("."), expr
        return dot.get(expr[1:]) if isinstance(dot, dict) else None

    def execute(nodes: list, dot, out: list[str]) -> None:
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "if":
                execute(node[2] if value(node[1], dot) else node[3], dot, out)
            elif node[0] == "range":
                for item in value(node[1], dot) or []:
                    execute(node[2], item, out)
            elif assign := re.fullmatch(r"\$(\w+)\s*:?=\s*(.+)", node[1]):
                variables[assign.group(1)] = value(assign.group(2), dot)
            else:
                out.append(str(value(node[1], dot)))

    nodes, _, closed = parse(0)
    assert closed is None, "an end without a block"
    out: list[str] = []
    execute(nodes, data, out)
    return "".join(out)


def ollama_prompt(modelfile: dict, messages: list[dict]) -> str:
    system = [m["content"] for m in messages if m["role"] == "system"]
    as_go = [{"Role": m["role"], "Content": m["content"]} for m in messages]  # api.Message fields
    data = {"System": system[0] if system else modelfile.get("SYSTEM"), "Messages": as_go}
    return go_render(modelfile["TEMPLATE"], data)


@pytest.mark.parametrize(
    "name, config, adds_bos, family",
    [
        ("smollm2", None, False, "ChatML"),
        ("llama3", LLAMA3_CONFIG, True, "Llama 3"),
        ("gemma2", GEMMA_CONFIG | {"chat_template": GEMMA2}, True, "Gemma"),
        ("gemma3", GEMMA_CONFIG | {"chat_template": GEMMA3}, True, "Gemma"),
        ("phi3", PHI3_CONFIG, False, "Phi-3"),
    ],
)
def test_recognised_templates_render_like_the_model_s_own(name, config, adds_bos, family):
    from mlxedge.formats.gguf.ollama import recognise

    config = config or resolve("smollm2").tokenizer.config
    assert recognise(config["chat_template"], config, adds_bos).family.name == family
    text, warnings = modelfile_text("m.gguf", config, adds_bos)
    assert not warnings
    parsed = dict(parse_modelfile(text))
    assert parsed["FROM"] == "./m.gguf"
    bos = config["bos_token"] if adds_bos else ""
    for conv in CONVERSATIONS:
        if name == "gemma2" and conv[0]["role"] == "system":
            continue  # its template refuses them
        theirs = _jinja_render(config["chat_template"], conv, config)
        assert bos + ollama_prompt(parsed, conv) == theirs


def test_the_go_interpreter_runs_only_the_branch_taken():
    """The checks above are only as good as the interpreter: a variable set in an untaken
    branch, or an else never run, would show here."""
    template = ('{{ $n := "a" }}{{ range .Messages }}{{ if eq .Role "user" }}U{{ $n = "b" }}'
                "{{ else }}O{{ end }}{{ end }}{{ $n }}{{ if $.System }}S{{ end }}")  # fmt: skip
    messages = [{"Role": "system"}, {"Role": "user"}]
    assert go_render(template, {"Messages": messages, "System": ""}) == "OUb"
    assert go_render(template, {"Messages": messages[:1], "System": "x"}) == "OaS"


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
