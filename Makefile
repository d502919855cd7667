# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs torch==2.13.0 (CPU build) first so nothing resolves a
# newer CUDA build, then the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test lint protos venv dev bench clean

$(VENV)/.base: pyproject.toml
	@echo "==> creating $(VENV) and installing torch==2.13.0 + fedcoord"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.base
	@echo "==> installing dev/test extras"
	$(PIP) -e '.[dev]'
	@command -v chromium >/dev/null || { echo "==> installing Debian's chromium (the report test renders in it)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "!! could not install chromium (needs root and apt); tests/e2e/test_report.py will fail"; }
	@touch $@

venv: $(VENV)/.base
dev: $(VENV)/.dev

demo: $(VENV)/.base
	$(VENV)/bin/fedcoord simulate examples/digits.yaml

test: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Regenerate the committed gRPC/protobuf code (tests fail when it is stale).
protos: $(VENV)/.dev
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/fedcoord/v1/*.proto

# Side-by-side benchmarks: every benchmarks/*.py module but the shared helpers; each
# prints a table, writes benchmarks/results/<name>.json and its section of RESULTS.md.
# flower_secagg is the Flower side of secagg, not a benchmark of its own.
BENCHMARKS := $(filter-out __init__ common flower_secagg,$(basename $(notdir $(wildcard benchmarks/*.py))))

bench: $(VENV)/.dev
	@for m in $(BENCHMARKS); do \
		echo "==> benchmarks.$$m"; \
		$(PY) -m benchmarks.$$m || exit 1; \
	done

clean:
	rm -rf $(VENV) runs build *.egg-info
