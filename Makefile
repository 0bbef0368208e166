# Everything sets itself up: a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SHARED_DATA ?= $(abspath ../shared/data)
DEMO_OUT ?= runs/cv-demo
LT_DEMO_OUT ?= runs/lt-demo

.PHONY: venv lint demo demo-lt test test-slow bench carry clean

# Installs exactly what CI tests: every version comes from requirements.lock (used as constraints, so a package
# pyproject.toml no longer needs is not installed). Refresh the lock with scripts/lock.sh after changing the
# dependencies in pyproject.toml. torch is pinned there without a build label: this machine's wheel folder gives
# the CPU build; elsewhere PyPI gives the CUDA build of the same release, and
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make venv gives the CPU one.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c requirements.lock --upgrade pip
	$(PIP) install -q -c requirements.lock -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# The product path: 4-fold patient-grouped CV of the 3D tSP model on the synthetic 530-patient cohort
# (written into ~/.cache/pancls, or $$PANCLS_CACHE, on first use), report in $(DEMO_OUT)/report.html.
demo: venv
	$(VENV)/bin/pancls cv --folds 4 --out $(DEMO_OUT) --resume

# The long-tailed CIFAR path: a 4-epoch tSP run on CIFAR-10-LT.
demo-lt: venv
	PANCLS_DATA=$(SHARED_DATA) $(VENV)/bin/pancls lt --config configs/lt_demo_cpu.yaml \
	    --data $(SHARED_DATA)/cifar10.npz --out $(LT_DEMO_OUT) --resume

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	PANCLS_DATA=$(SHARED_DATA) $(PY) -m pytest -q

test-slow: venv
	PANCLS_DATA=$(SHARED_DATA) $(PY) -m pytest -q -m slow

# Data for a GPU session (see scripts/gpu_lt.sh): the device copies the repo only, 64 MiB at most.
carry: venv
	$(PY) -c "from pancls.data.cifar import write_lt_subset; write_lt_subset('$(SHARED_DATA)/cifar10.npz', 'carry/cifar10_lt_ir100.npz', 'cifar10', 100)"

# pancls vs SimpleITK vs dcm2niix reading the two DICOM fixtures of $(SHARED_DATA)/ct (the README's table)
bench: venv
	PANCLS_DATA=$(SHARED_DATA) $(PY) bench/ingest_speed.py --runs 7 --cli

clean:
	rm -rf $(VENV) runs .pytest_cache
