# Everything a fresh machine needs: `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-postgres test-fast lint docs verify bench gpu-check data clean vision-venv test-vision compat

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jacmatch demo

# One worker per core, each with one torch thread (the tests' models are small: a thread per
# core does more than several threads on one test); each test goes where a worker is free.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not vision and not postgres" -n auto --dist worksteal

# The tier to run while working: no subprocesses, torchrun or training-heavy tests (seconds).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not vision and not postgres"

# ruff on the package and tests, mypy on the maths (jacmatch/core); settings in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check jacmatch tests
	$(BIN)/mypy

# The manual (docs/) as a site under site/, with the API reference from the docstrings; strict:
# a broken link or docstring reference fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

verify: $(STAMP)
	$(BIN)/jacmatch verify --json results/verify.json --plot results/verify.png

bench: $(STAMP)
	$(BIN)/jacmatch bench --json results/bench.json

# On a CUDA machine with its own PyTorch (no install): the CUDA tests, the bench on the GPU
# (results/bench_cuda.json, a GPU table in BENCHMARKS.md), fp16/bf16 distillation.
gpu-check:
	.ci/gpu-check

# Real data for the experiments (needs root; Debian package).
data:
	apt-get install -y dataset-fashion-mnist

clean:
	rm -rf $(VENV) runs

# The optional torchvision/timm routes: a separate venv (torch 2.14.1 is the build that
# torchvision installs beside on this machine; several GB). Never used by `make test`.
VISION ?= .venv-vision
$(VISION)/.installed: pyproject.toml
	test -d $(VISION) || $(PYTHON) -m venv $(VISION)
	$(VISION)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 timm torchdistill==1.1.5
	$(VISION)/bin/pip install -q -e '.[test]'
	touch $@

vision-venv: $(VISION)/.installed

# jacmatch tune's shared study on a real PostgreSQL server the test starts (needs Debian's
# postgresql: apt-get install postgresql; .ci/run installs it).
test-postgres: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m postgres

test-vision: $(VISION)/.installed
	$(VISION)/bin/python -m pytest -m vision

# docs/compatibility.md: every torchvision classification model and a set of timm families.
compat: $(VISION)/.installed
	$(VISION)/bin/jacmatch compat --out docs/compatibility.md --json results/compatibility.json
