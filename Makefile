# `make demo` and `make test` work on a fresh machine with Python 3.11 and the package registries.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
LEGACY_LAB := .legacy-lab
LEGACY_LAB_032 := .legacy-lab-0.1.1
BITSANDBYTES := .bitsandbytes

.PHONY: setup demo test lint format clean task-folder

setup: $(STAMP)

$(STAMP): setup.sh requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	. $(VENV)/bin/activate && bash setup.sh
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	@# Real SentencePiece tokenizer models for the data tests; only its data files are read, so none of its
	@# runtime dependencies are needed.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps mistral-common==1.13.1
	@# The lab SDKs of TransformerLab 0.31 and 0.32 (legacy job store), kept apart for the legacy-host tests.
	rm -rf $(LEGACY_LAB) $(LEGACY_LAB_032)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --target $(LEGACY_LAB) transformerlab==0.0.98
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --target $(LEGACY_LAB_032) transformerlab==0.1.1
	@# bitsandbytes for the QLoRA-on-the-CPU tests, kept apart: installed beside peft, every rank would import it
	@# (1.8 s each), QLoRA or not. The tests that need it put it on PYTHONPATH.
	rm -rf $(BITSANDBYTES)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --target $(BITSANDBYTES) bitsandbytes==0.50.2
	@touch $@

demo: setup
	$(PY) demo/run_demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

# The folder current TransformerLab adds a task from (`lab task add`, the web UI's upload): README.md says why.
task-folder:  # Python alone: nothing to install
	$(PYTHON) tools/task_folder.py

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) $(LEGACY_LAB) $(LEGACY_LAB_032) $(BITSANDBYTES) demo/workspace dist
