# The README's commands. Each sets up .venv on first use (CPU torch first, then this package), so a fresh
# machine needs nothing else. Override the torch build with e.g. `make demo TORCH_SPEC="torch==2.13.0"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tensorpeft-installed

.PHONY: demo test app setup clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	@$(PY) -m pip install --quiet -e ".[test,app]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tensorpeft demo $(ARGS)

# the browser app on http://localhost:8080/ (scans from DATA_ROOT; another host needs a token: see docs/app.md)
DATA_ROOT ?= .
app: $(STAMP)
	$(VENV)/bin/tensorpeft app --data-root $(DATA_ROOT) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest Testing -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
