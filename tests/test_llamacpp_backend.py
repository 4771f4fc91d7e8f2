"""llama.cpp in the harness: our GGUF exports of SmolLM2 run in llama.cpp as in our reference.

- F32 export: largest logit difference from the numpy reference <= 1e-3 (float32 KV cache).
- Greedy generation from "The capital of France is": llama.cpp generates 32 tokens with its own
  greedy loop; the reference, teacher-forced on that sequence, picks the same token at every step
  where its top-2 logit margin exceeds 0.01.
- Every mix loads, and passes the harness's fidelity gate (mean KL <= 0.01 from the reference run
  on the file's own dequantized weights, stated in runtime/llamacpp_runner.py before measuring):
  a few representative mixes in `make test`, the rest in the slow tests (the tiny models of
  tests/test_gguf_mix.py run every mix in llama.cpp on every run).
"""

from __future__ import annotations

import numpy as np
import pytest
from llamacpp_util import llama_cpp

from mlxedge.formats.gguf.mixes import MIXES
from mlxedge.formats.gguf.writer import write_gguf
from mlxedge.harness import crosscheck
from mlxedge.runtime.llamacpp_runner import QUANTIZED_TOLERANCE
from mlxedge.runtime.reference import ReferenceModel
from mlxedge.source import resolve
from mlxedge.texts import load_text

pytestmark = pytest.mark.llamacpp
PROMPT = "The capital of France is"
MARGIN = 0.01
STEPS = 32
# One of each family: legacy blocks, 8-bit, the K-quant mixes people use most (with their
# fall-backs on SmolLM2's 576-wide rows), the lowest, and a float type.
REPRESENTATIVE_MIXES = ("Q4_0", "Q8_0", "Q4_K_M", "Q2_K", "F16")


@pytest.fixture(scope="module")
def f32_gguf(smollm2, tmp_path_factory):
    llama_cpp()
    path = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    write_gguf(smollm2, path, "F32")
    return path


def test_f32_export_passes_the_crosscheck_at_1e_3(f32_gguf, smollm2, smollm2_reference):
    (row,) = crosscheck([resolve(str(f32_gguf))], smollm2, load_text(None), ("llamacpp",),
                        ctx=256, max_windows=1, original=smollm2_reference)  # fmt: skip
    assert row.backend == "llamacpp" and row.skipped is None and row.passed
    assert row.fidelity["max_abs_logit"] <= 1e-3
    assert row.quality["tokens"] == 127  # llama.cpp's protocol: the window's second half


def _margin(logits: np.ndarray) -> float:
    top2 = np.sort(logits)[-2:]
    return float(top2[1] - top2[0])


def test_greedy_generation_agrees_with_the_reference(smollm2, f32_gguf):
    lc = llama_cpp()
    llm = lc.Llama(model_path=str(f32_gguf), n_ctx=128, logits_all=True, verbose=False,
                   n_threads=1, type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32)  # fmt: skip
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False)
    assert prompt == smollm2.tokenizer.hf.encode(PROMPT).ids
    theirs = []  # llama.cpp's own greedy loop
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(int(token))
        if len(theirs) == STEPS:
            break
    assert len(theirs) == STEPS
    # The reference teacher-forced on llama.cpp's sequence: one forward pass, not 32.
    ref = ReferenceModel.from_source(smollm2.config, smollm2.weights)
    logits = ref.logits(np.array(prompt + theirs[:-1]), first=len(prompt) - 1)  # (STEPS, vocab)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > MARGIN
    assert clear.sum() >= 24  # the check must cover most of the 32 tokens
    picks = logits.argmax(axis=-1)
    wrong = [(i, int(picks[i]), theirs[i]) for i in np.flatnonzero(clear) if picks[i] != theirs[i]]
    assert not wrong, f"(step, reference, llama.cpp): {wrong}"


def _mix_params():
    for mix in MIXES:
        if mix == "F32":
            continue
        marks = () if mix in REPRESENTATIVE_MIXES else (pytest.mark.slow,)
        yield pytest.param(mix, marks=marks)


@pytest.mark.parametrize("mix", list(_mix_params()))
def test_every_mix_of_smollm2_passes_the_llamacpp_fidelity_gate(
    smollm2, smollm2_reference, mix, tmp_path
):
    llama_cpp()
    path = tmp_path / f"smollm2-{mix}.gguf"
    write_gguf(smollm2, path, mix)
    (row,) = crosscheck([resolve(str(path))], smollm2, load_text(None), ("llamacpp",),
                        ctx=128, max_windows=1, original=smollm2_reference)  # fmt: skip
    assert row.skipped is None
    assert row.fidelity["kl_mean"] <= QUANTIZED_TOLERANCE.kl_mean and row.fidelity_ok
    assert row.quality_ok, row.quality
