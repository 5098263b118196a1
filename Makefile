# gemma-mesh: the two set-up commands of the README are `make demo` and `make test`.
# Both install what they need first (Debian packages, a virtualenv with the project and its extras).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# chromium: the browser test; prometheus: promtool (rule tests, /metrics checks); redis-server: tests of their own.
APT_PACKAGES := pocketsphinx-testdata ffmpeg espeak-ng chromium prometheus redis-server

.PHONY: setup apt venv demo test lint bundle protos schemas redis

setup: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# The main job: a real photo and a real speech recording through the model (embedded tiny bundle).
# DEMO_ARGS: options of `gemma-mesh demo`, e.g. make demo DEMO_ARGS="--port 8100 --no-keep-running"
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/gemma-mesh demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check services tests scripts bench deploy
	$(VENV)/bin/ruff format --check services tests scripts bench deploy

# Regenerate the embedded bundle after changing make-tiny or the exporter.
bundle: venv
	$(PY) scripts/build_embedded_bundle.py

protos: venv
	$(PY) scripts/gen_protos.py

schemas: venv
	$(PY) scripts/gen_schemas.py

# The tests use the Redis on 127.0.0.1:6379 (and start their own redis-server for restarts).
redis:
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  echo "starting redis-server on 127.0.0.1:6379"; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
	    --dir /tmp --logfile /tmp/gemma-mesh-redis.log; \
	  for i in $$(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done; }

test: setup lint redis
	$(PY) scripts/gen_protos.py --check
	$(PY) scripts/gen_schemas.py --check
	$(VENV)/bin/pytest -q
