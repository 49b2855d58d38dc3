# The README's two commands. Both build .venv from scratch when it is missing and refresh it
# when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# constraints.txt pins every transitive package: a fresh install resolves in seconds.
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# torchattacks declares requests~=2.25.1 (conflicts with mlflow/ray) but never imports it.
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1
	# The browser test drives Debian's Chromium (headless). Install it when we can (root with
	# apt-get); never fail the install over it: without it that one test skips, saying why.
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -q && apt-get install -y -q --no-install-recommends chromium; } \
	  || echo "chromium not installed: the browser test will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/robust-study demo

test: $(STAMP)
	# Lint (ruff, the whole repository) and type-check (mypy: defenses/ and search_spaces/, the
	# layers and spaces third parties build on) before the tests: both take seconds.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	# The unmarked tests on two workers (as test-fast), then the marked ones on two workers too:
	# each starts its own Ray instance, namespaces, ports and temp dirs, so they can run side by
	# side. They are mostly CPU-bound, so this gains 16 % (42 instead of 50 min, 2026-12-03).
	# loadscope keeps a module's tests on one worker: its shared fixture is built once (and the
	# three modules sharing the MLflow server on one worker: tests/conftest.py).
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow and not ray and not server"
	$(PY) -m pytest -q -n 2 --dist loadscope -m "slow or ray or server" --durations=20

# The inner loop while developing: lint, types and every test that needs no trained model, no Ray
# and no service. CI runs `make test` (everything). Two workers, one per core; worksteal because a
# few tests (gradchecks, CLI subprocesses) take far longer than the rest.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow and not ray and not server"

bench: $(STAMP)
	$(VENV)/bin/robust-study bench layers

clean:
	rm -rf $(VENV)
