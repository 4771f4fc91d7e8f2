"""Render a chat template on probe conversations, as transformers does (sandboxed Jinja with its
whitespace rules), bounded in time and memory.

A model's chat template is untrusted text. Jinja's sandbox stops it from reaching Python's
internals but not from looping for hours (nested `range(100000)` loops) or building a 4 GB
string (`'x' * 4000000000`); neither can be stopped from inside the same process. So
`render_bounded` runs this file as a child process (it imports nothing of mlxedge) with an
address-space and CPU limit and a wall-clock timeout; `render` is the renderer itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

TIME_LIMIT_S = 10
MEMORY_LIMIT = 1 << 30


def render(template: str, conversations: list, bos: str, eos: str) -> list[str]:
    """The prompt the template gives each conversation (with the generation prompt)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return [
        compiled.render(messages=c, add_generation_prompt=True, bos_token=bos, eos_token=eos)
        for c in conversations
    ]


def render_bounded(template: str, conversations: list, bos: str, eos: str) -> list[str] | str:
    """`render` in a child process; the renders, or why there are none (a one-line reason)."""
    request = json.dumps({"template": template, "conversations": conversations, "bos": bos,
                          "eos": eos, "seconds": TIME_LIMIT_S, "memory": MEMORY_LIMIT})  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, "-I", __file__],
            input=request,
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT_S + 5,
        )
    except subprocess.TimeoutExpired:
        return f"rendering it took over {TIME_LIMIT_S} s"
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"rendering it took over {TIME_LIMIT_S} s of CPU time"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["killed"])[-1]
        return f"it does not render ({last[:200]})"
    return json.loads(done.stdout)


def _main() -> None:
    import resource

    request = json.loads(sys.stdin.read())
    seconds, memory = int(request["seconds"]), int(request["memory"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
    try:
        renders = render(request["template"], request["conversations"], request["bos"],
                         request["eos"])  # fmt: skip
    except MemoryError:
        sys.exit(f"it needs over {memory >> 20} MiB")
    except Exception as exc:  # noqa: BLE001 - any failure means: not a template we recognise
        sys.exit(f"{type(exc).__name__}: {exc}")
    sys.stdout.write(json.dumps(renders))


if __name__ == "__main__":
    _main()
