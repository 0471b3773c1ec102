# Everything a fresh machine needs: `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test verify bench data clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jacmatch demo

test: $(STAMP)
	$(BIN)/python -m pytest

verify: $(STAMP)
	$(BIN)/jacmatch verify --json results/verify.json --plot results/verify.png

bench: $(STAMP)
	$(BIN)/jacmatch bench --json results/bench.json

# Real data for the experiments (needs root; Debian package).
data:
	apt-get install -y dataset-fashion-mnist

clean:
	rm -rf $(VENV) runs
