# Everything sets itself up: a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU wheel by default; a CUDA workstation sets TORCH_SPEC="torch==2.13.0" with its own index, or uses the Docker image.
TORCH_SPEC ?= torch==2.13.0
SHARED_DATA ?= $(abspath ../shared/data)
DEMO_OUT ?= runs/demo

.PHONY: venv demo test test-slow bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	PANCLS_DATA=$(SHARED_DATA) $(VENV)/bin/pancls lt --config configs/lt_demo_cpu.yaml \
	    --data $(SHARED_DATA)/cifar10.npz --out $(DEMO_OUT) --resume

test: venv
	PANCLS_DATA=$(SHARED_DATA) $(PY) -m pytest -q

test-slow: venv
	PANCLS_DATA=$(SHARED_DATA) $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
