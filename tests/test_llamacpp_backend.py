"""llama.cpp in the harness: our GGUF exports of SmolLM2 run in llama.cpp as in our reference.

- F32 export: largest logit difference from the numpy reference <= 1e-3 (float32 KV cache).
- Greedy generation from "The capital of France is": llama.cpp and the reference agree on every
  token whose top-2 logit margin in the reference exceeds 0.01.
- Every mix loads, and passes the harness's fidelity gate (mean KL <= 0.01 from the reference run
  on the file's own dequantized weights, stated in runtime/llamacpp_runner.py before measuring).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from llamacpp_util import llama_cpp
from tokenizers import Tokenizer

from mlxedge.cli import main
from mlxedge.crosscheck import crosscheck
from mlxedge.formats.gguf_export import write_gguf
from mlxedge.formats.gguf_mix import MIXES
from mlxedge.runtime.artifact import open_model
from mlxedge.runtime.llamacpp_runner import QUANTIZED_TOLERANCE
from mlxedge.runtime.reference import ReferenceModel
from mlxedge.texts import load_text

pytestmark = pytest.mark.llamacpp
PROMPT = "The capital of France is"
MARGIN = 0.01


@pytest.fixture(scope="module")
def smollm2():
    return open_model("smollm2")


@pytest.fixture(scope="module")
def f32_gguf(smollm2, tmp_path_factory):
    llama_cpp()
    path = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    write_gguf(smollm2, path, "F32")
    return path


def test_f32_export_passes_the_crosscheck_at_1e_3(f32_gguf):
    result = CliRunner().invoke(
        main,
        ["crosscheck", str(f32_gguf), "--reference", "smollm2", "--backends", "llamacpp",
         "--windows", "1", "--ctx", "256", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["backend"] == "llamacpp" and row["passed"]
    assert row["fidelity"]["max_abs_logit"] <= 1e-3
    assert row["quality"]["tokens"] == 127  # llama.cpp's protocol: the window's second half


def _margin(logits: np.ndarray) -> float:
    top2 = np.sort(logits)[-2:]
    return float(top2[1] - top2[0])


def test_greedy_generation_agrees_with_the_reference(smollm2, f32_gguf):
    lc = llama_cpp()
    llm = lc.Llama(model_path=str(f32_gguf), n_ctx=128, logits_all=True, verbose=False,
                   n_threads=2, type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32)  # fmt: skip
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False)
    assert prompt == Tokenizer.from_str(smollm2.tokenizer_json.decode()).encode(PROMPT).ids
    ref = ReferenceModel.from_source(smollm2.config, smollm2.weights)
    ours, margins = list(prompt), []
    for _ in range(32):
        last = ref.logits(np.array(ours))[-1]
        margins.append(_margin(last))
        ours.append(int(np.argmax(last)))
    generated = ours[len(prompt) :]
    # llama.cpp's own greedy loop, until the first token the reference finds too close to call
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(int(token))
        if len(theirs) == 32:
            break
    for i, (a, b) in enumerate(zip(generated, theirs, strict=False)):
        if margins[i] <= MARGIN:
            break
        assert a == b, f"token {i}: reference {a}, llama.cpp {b} (margin {margins[i]:.3f})"
    # teacher-forced on the reference's sequence: every clear-margin argmax agrees
    llm.reset()
    llm.eval(ours)
    scores = np.array(llm.scores[len(prompt) - 1 : len(ours) - 1])
    clear = [i for i, m in enumerate(margins) if m > MARGIN]
    assert len(clear) >= 24  # the check must cover most of the 32 tokens
    assert all(int(np.argmax(scores[i])) == generated[i] for i in clear)


@pytest.mark.parametrize("mix", [m for m in MIXES if m != "F32"])
def test_every_mix_of_smollm2_passes_the_llamacpp_fidelity_gate(smollm2, mix, tmp_path):
    llama_cpp()
    path = tmp_path / f"smollm2-{mix}.gguf"
    write_gguf(smollm2, path, mix)
    (row,) = crosscheck([open_model(str(path))], smollm2, load_text(None), ("llamacpp",),
                        ctx=128, max_windows=1)  # fmt: skip
    assert row.skipped is None
    assert row.fidelity["kl_mean"] <= QUANTIZED_TOLERANCE.kl_mean and row.fidelity_ok
    assert row.quality_ok, row.quality
