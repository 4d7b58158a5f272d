# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test benchmarks clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffusers-spm demo --output outputs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

benchmarks: $(STAMP)
	$(PY) benchmarks/inference_overhead.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
