# The commands people run. `make demo` and `make test` each set everything up from a clean
# clone (a virtual environment in .venv) and then run; see README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= stad-demo

.PHONY: demo test lint bench clean browser

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

# The browser test of evaluate's report.html runs Debian's headless chromium: installed here
# where apt-get runs as root (CI, a fresh machine), else that one test says why it skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { apt-get install -y -q chromium >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } \
	  || echo "chromium could not be installed: tests/test_report.py's browser test will skip"; }

test: $(VENV)/.installed-test browser
	$(BIN)/ruff check stad tests plugins benchmarks
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check stad tests plugins benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
