# Two commands do all set-up on a fresh machine:
#   make demo   -> install, then the end-to-end demo (pre-train on Fashion-MNIST, evaluate, report)
#   make test   -> install, then the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install system-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision first, pinned to the releases available on this platform's local wheels
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed system-deps

# Debian packages: the Fashion-MNIST data (DATA.md) and Chromium + ChromeDriver for the search page's browser test;
# skipped with a note where apt is unavailable or we are not root (the tests that need them skip with a reason).
system-deps:
	@missing=""; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "note: cannot apt-get install$$missing here; tests that need them skip, the demo needs the data"; fi

test: install
	$(PY) -m pytest -q -rs

demo: install
	$(PY) -m florence demo --workdir runs/demo

clean:
	rm -rf $(VENV) runs build *.egg-info
