# Every target sets itself up on a fresh machine: .venv is created and the project installed on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 are the builds this machine's pip serves from disk.
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: test bench reproduce install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/throughput.py

# the paper's experiments in miniature on this CPU (about 65 minutes): reports/cpu/REPORT.md
reproduce: $(STAMP)
	$(PY) train/reproduce.py --scale cpu

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
