# gemma-mesh: the two set-up commands of the README are `make demo` and `make test`.
# Both install what they need first: `make demo` a virtualenv with the package alone (its runtime
# dependencies: no torch, no test tools); `make test` the Debian packages the tests use and the
# `test` extra (the exporter's torch and transformers, the reference implementations, the tools).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# chromium: the browser test; prometheus: promtool (rule tests, /metrics checks); redis-server: tests
# of their own; pocketsphinx-testdata: LibriVox speech; ffmpeg, espeak-ng: test media.
APT_PACKAGES := pocketsphinx-testdata ffmpeg espeak-ng chromium prometheus redis-server

.PHONY: setup apt venv venv-runtime demo test wheel-smoke lint bundle protos schemas redis

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

# The package alone, as `pip install gemma-mesh` installs it (a venv made by `make test` has it too).
venv-runtime: $(VENV)/.installed-runtime

$(VENV)/.installed-runtime: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@touch $@

# The main job: a real photo and a real speech recording (both shipped in the package) through the
# model (the embedded tiny bundle). Needs Python 3.11+ with venv, nothing else.
# DEMO_ARGS: options of `gemma-mesh demo`, e.g. make demo DEMO_ARGS="--port 8100 --no-keep-running"
DEMO_ARGS ?=
demo: venv-runtime
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

# The wheel as users get it: built with `python -m build`, installed into an empty virtualenv,
# `gemma-mesh --version`, `gemma-mesh up`, one transcription and one chat completion.
wheel-smoke: venv
	$(PY) scripts/wheel_smoke.py

test: setup lint redis
	$(PY) scripts/gen_protos.py --check
	$(PY) scripts/gen_schemas.py --check
	$(PY) scripts/wheel_smoke.py
	$(VENV)/bin/pytest -q
