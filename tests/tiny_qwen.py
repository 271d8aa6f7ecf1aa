"""A tiny random-weight Qwen3 model folder that a real vLLM server can serve, for LLM tests and the
CPU throughput bench. Run with the vLLM environment's python (it has torch, transformers and
tokenizers; the main .venv need not):

    .venv-vllm/bin/python tests/tiny_qwen.py OUT_DIR

The folder holds what a Hugging Face Qwen3 checkpoint holds: config.json (Qwen3ForCausalLM, 2 layers,
hidden 128, 2 heads, head_dim 64: vLLM's CPU attention rejects 16), model.safetensors (random
weights, seeded), generation_config.json, and a byte-level BPE tokenizer trained here on a small
corpus of JSON, English words and digits, with Qwen's special tokens and a chat template that honours
`enable_thinking` (false -> an empty `<think>` block, as Qwen3's own template does). Builds in a few
seconds; writes `.complete` last, so a half-written folder is rebuilt."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SERVED_NAME = "tiny-qwen3"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VOCAB_SIZE = 3072

# Qwen3's chat template without the tool-calling parts: the same turn markers and the same
# `enable_thinking` switch (false -> the assistant turn opens with an empty think block).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_WORDS = (
    "the a an of and to in with for on at by from music video clip tempo key chord major minor beat "
    "bar scene cut bright dark calm energetic happy sad epic ambient piano guitar drums bass strings "
    "synth vocals choir orchestra electronic rock jazz pop classical folk cinematic upbeat slow fast "
    "mood genre instruments prompt caption attributes confidence description warm cold gentle driving "
    "melodic rhythmic loud quiet sunset city ocean forest night day people dancing walking running "
    "true false null yes no system user assistant json schema answer only follow"
).split()


def _corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))).capitalize() + ".")
        elif kind == 1:
            obj = {rng.choice(_WORDS): rng.choice([rng.randint(-999, 99999), round(rng.uniform(0, 300), 2),
                                                   rng.choice(_WORDS), rng.random() < 0.5, None,
                                                   [rng.choice(_WORDS) for _ in range(rng.randint(0, 3))]])
                   for _ in range(rng.randint(1, 5))}
            out.append(json.dumps(obj, indent=rng.choice([None, 2])))
        elif kind == 2:
            out.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(rng.randint(2, 10))))
        else:
            out.append('{"prompt": "' + " ".join(rng.choice(_WORDS) for _ in range(6)) + '", "bpm": '
                       + str(rng.randint(60, 180)) + ', "key": "' + rng.choice("ABCDEFG") + rng.choice(["", "#", "b"])
                       + " " + rng.choice(["major", "minor"]) + '"}')
    return out


def build_tokenizer(seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
                                   model_max_length=4096, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the model folder (skipped when a complete one is there); returns its path."""
    out = Path(out_dir)
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer(seed)
    tokenizer.save_pretrained(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0, torch_dtype="float32",
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                     pad_token_id=ids["<|endoftext|>"], do_sample=True, temperature=0.7, top_p=0.8,
                     top_k=20).save_pretrained(out)
    if not list(out.glob("*.safetensors")):
        raise RuntimeError(f"no safetensors weights written to {out}")
    (out / ".complete").write_text(json.dumps({"vocab_size": vocab, "seed": seed}))
    return out


def build_in_subprocess(python: str | Path, out_dir: str | Path, timeout_s: float = 300.0) -> Path:
    """From any interpreter (the main .venv has no matching transformers): run this file with the
    vLLM environment's `python` to build the folder; raises with its output when that fails."""
    import subprocess

    out = Path(out_dir)
    if (out / ".complete").exists():
        return out
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), str(out)], capture_output=True, text=True,
                          timeout=timeout_s, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not (out / ".complete").exists():
        raise RuntimeError(f"building the tiny Qwen3 failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: .venv-vllm/bin/python tests/tiny_qwen.py OUT_DIR")
    print(build(sys.argv[1]))
