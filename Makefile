# The commands people run. `make demo` and `make test` each set everything up from a clean
# clone (a virtual environment in .venv) and then run; see README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= stad-demo

.PHONY: demo test lint bench clean

$(VENV)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[plots]'
	touch $@

$(VENV)/.installed-test: pyproject.toml plugins/stad-btad/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]' -e ./plugins/stad-btad
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/stad demo --out $(DEMO_OUT)

test: $(VENV)/.installed-test
	$(BIN)/ruff check stad tests plugins benchmarks
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check stad tests plugins benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
