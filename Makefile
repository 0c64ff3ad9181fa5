# Two entry points (see README "Quick start"): `make demo` and `make test`.
# Both install what they need first: Debian packages (PostgreSQL server, pgbench, PgBouncer,
# iproute2, nftables) when missing, then a virtualenv with pgsidecar and its test extras.
# `make test` runs `lint` and `typecheck` first (seconds), then the whole suite; `make unit` runs
# only the socket-free unit tests.
PY ?= python3
VENV ?= .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PKGS := postgresql postgresql-client postgresql-contrib pgbouncer iproute2 nftables iptables procps python3-venv
STAMP := $(VENV)/.pgsidecar-installed

.PHONY: setup system-packages demo lint typecheck unit test bench bench-quick clean

setup: system-packages $(STAMP)

system-packages:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/pgsidecar demo

# Rules and excludes: pyproject.toml [tool.ruff] and [tool.mypy].
LINT_PATHS := pgsidecar tests bench tools

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/python -m pytest tests/unit

test: setup lint typecheck
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python -m bench

bench-quick: setup
	$(VENV)/bin/python -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
