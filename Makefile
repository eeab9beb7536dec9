# Two entry points for a fresh machine:  make demo  |  make test
# The virtualenv lives outside the clone (created once, reused by every clone and by CI).
VENV ?= $(HOME)/.venvs/noisystudent
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo

.PHONY: setup demo test lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-or-CUDA builds that lie on this project's machines; nothing newer is required
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1

setup: $(PY)
	$(PY) -m pip install -q -e '.[test]'

# Teacher -> 2 rounds of pseudo-labels + noised students on the embedded digits, then the report.
demo: setup
	$(PY) -m noisystudent stage=iterate run_dir=$(RUN_DIR)

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf runs outputs .pytest_cache
