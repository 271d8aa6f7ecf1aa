# `make demo` and `make test` each build .venv/ on a fresh machine when it is missing; both are idempotent.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_IN ?= demo_videos
DEMO_OUT ?= demo_out

.PHONY: env demo test test-fast bench clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: env
	test -d $(DEMO_IN) || $(BIN)/python -m pipeline.synth $(DEMO_IN) --videos 6 --seconds 24
	$(BIN)/python pipeline/build.py --input $(DEMO_IN) --output $(DEMO_OUT) --config pipeline/configs/demo.yaml

test: env
	$(BIN)/python -m pytest -q

test-fast: env
	$(BIN)/python -m pytest -q -m "not slow"

# The music21 figures render real scores with fluidsynth and the GM soundfont (Debian packages).
bench: env
	command -v fluidsynth >/dev/null || (apt-get update -qq && apt-get install -y -qq fluidsynth fluid-soundfont-gm)
	$(BIN)/python -m bench.pipeline_throughput --videos 24
	$(BIN)/python -m bench.pipeline_throughput --videos 8 --width 1280 --height 720
	$(BIN)/python -m bench.music21_accuracy

clean:
	rm -rf $(DEMO_OUT) bench/work
