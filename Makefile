# lic-deploy: `make demo` and `make test` each set up .venv when missing and install everything they use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= $(or $(LIC_DEPLOY_DATA),../shared/data)
OUT    ?= out

.PHONY: demo test lint bench-export bench-codec clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e ".[export,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check lic_deploy tests
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check lic_deploy tests

demo: $(STAMP)
	$(PY) -m lic_deploy.bench.demo --data $(DATA) --out $(OUT)/demo

bench-export: $(STAMP)
	$(PY) -m lic_deploy.bench.export_bench --out $(OUT)/bench-export

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
