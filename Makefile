# Two commands do all the set-up: `make demo` and `make test`. Both create .venv/ when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
DEMO   := demo-out

.PHONY: demo test lint format venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "mergeflow needs Python 3.11+ (found %s); set PYTHON=python3.11" % sys.version.split()[0]'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

# Generate a small checkpoint family, merge it with TALL masks + consensus on a local Ray
# runtime, summarise it, and rebuild one task's model from the compressed bundle.
demo: $(STAMP)
	@test -f $(DEMO)/family/config.yaml || $(VENV)/bin/mergeflow make-family $(DEMO)/family --tasks 8 --layers 12 --hidden 384 --vocab 4096 --shards 2
	$(VENV)/bin/mergeflow merge $(DEMO)/family/config.yaml --output $(DEMO)/run --overwrite
	$(VENV)/bin/mergeflow reconstruct $(DEMO)/run --task task_03 --output $(DEMO)/task_03 --overwrite
	@echo "plot of task overlap per layer: $(DEMO)/run/stats/task_overlap.png"

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

format: $(STAMP)  # what `make test` checks, applied
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(DEMO) .pytest_cache
