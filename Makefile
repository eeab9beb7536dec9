# Two entry points for a fresh machine:  make demo  |  make test
# The virtualenv lives outside the clone (created once, reused by every clone and by CI). Every package is
# installed at the exact release in requirements-lock.txt, so the demo's numbers are the README's.
VENV ?= $(HOME)/.venvs/noisystudent
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
LOCK := requirements-lock.txt
# The demo's students move with torch's thread count (README, "What the numbers depend on"): the demo runs
# with 2, as README's figures were measured, whatever the machine's core count.
DEMO_THREADS ?= 2

.PHONY: setup demo test test-quick lint docs package check-demo lock clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-or-CUDA builds that lie on this project's machines; nothing newer is required
	$(PY) -m pip install -q -c $(LOCK) torch==2.14.1 torchvision==0.29.1

setup: $(PY)
	$(PY) -m pip install -q -c $(LOCK) -e '.[test,docs]'

# Teacher -> 2 rounds of pseudo-labels + noised students on the embedded digits, then the report.
demo: setup
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m noisystudent stage=iterate run_dir=$(RUN_DIR)

lint: setup
	$(VENV)/bin/ruff check .

# the whole suite (what CI runs), with the slowest tests named at the end
test: lint
	$(PY) -m pytest -q --durations=15

# for local work: everything but the multi-process, kill and whole-loop tests (marked slow)
test-quick: setup
	$(PY) -m pytest -q -m "not slow"

# the documentation site (docs/, mkdocs.yml); --strict: a broken link or a page missing from nav fails
docs: setup
	$(VENV)/bin/mkdocs build --strict -d site

# the package as users install it (CI): sdist and wheel built and checked, the wheel installed into a fresh
# virtualenv and run from an empty directory (.ci/check_package)
package: setup
	VENV=$(VENV) bash .ci/check_package

# the demo's seed-0 figures against README's (CI), from a fresh run on the CPU (README's figures are CPU
# figures): fails, naming the rows and what differs from the lock, when a release or a change moved one
check-demo: setup
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) .ci/check_demo.py "$$(mktemp -d)/demo"

# resolve requirements-lock.txt afresh from pyproject.toml's ranges (then: make check-demo)
lock: $(PY)
	PY=$(PY) bash .ci/lock

clean:
	rm -rf runs outputs site .pytest_cache
