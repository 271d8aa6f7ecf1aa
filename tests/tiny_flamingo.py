"""A tiny random-weight MusicFlamingo model folder for tests (`from tiny_flamingo import make_tiny_flamingo`),
loadable fully offline with `MusicFlamingoForConditionalGeneration.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)`:

- config.json: a `MusicFlamingoConfig` with a 2-layer AudioFlamingo3 encoder (hidden 64, 2 heads of 32,
  128 mel bins, 1500 source positions: one 30 s Whisper window, as the real one) and a 2-layer Qwen2
  text backbone (hidden 64, 2 heads of 32, 1 kv head); the audio/sound-bos/sound-eos token ids point
  at the tokenizer's own special tokens.
- model.safetensors: random weights (seeded).
- the processor: a `WhisperFeatureExtractor` (16 kHz, 128 mel bins, 30 s chunks; built from its
  constructor, nothing downloaded), a byte-level BPE tokenizer trained here with `tokenizers` on a
  small music-words corpus (special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<sound>`,
  `<|sound_bos|>`, `<|sound_eos|>`), and the AudioFlamingo3/MusicFlamingo chat template (ChatML; a
  user turn with audio starts with one `<sound>`, which the processor expands to one token per
  audio embedding, framed by sound-bos/eos).
- generation_config.json: greedy, with the special tokens suppressed, so that a random model's answer
  is never empty (tests assert on the shape of the answers, not their words).

Builds in a few seconds; `.complete` is written last, so a half-written folder is rebuilt.
    .venv/bin/python tests/tiny_flamingo.py OUT_DIR"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<sound>", "<|sound_bos|>", "<|sound_eos|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS]
VOCAB_SIZE = 1024
HIDDEN = 64  # both towers; heads of 32 (vLLM's CPU attention needs head_dim >= 32)

# The processor chat template of the AudioFlamingo3/MusicFlamingo HF conversions: ChatML, a default
# system turn, and one `<sound>` placeholder ahead of the text of a turn that carries audio.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or c.get('type') == 'audio_url' or c.get('type') == 'input_audio' %}"
    "{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}"
    "{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

_WORDS = (
    "the a an of and with in at this track song clip music genre tempo bpm key major minor chord "
    "progression verse chorus bridge intro outro drop build beat groove rhythm melody harmony bass "
    "drums piano guitar strings synth pad lead vocals choir brass horns organ percussion orchestra "
    "electronic ambient rock pop jazz folk classical cinematic techno house hip hop lofi trap funk "
    "soul blues metal country mood happy sad calm dark bright warm epic dreamy energetic tense "
    "uplifting melancholic instrumental female male voice no yes is are has features around slow fast "
    "C D E F G A B sharp flat describe caption what which answer"
).split()


def _corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 18)))
        if i % 3 == 0:
            words += f" {rng.randint(60, 180)} BPM in {rng.choice('CDEFGAB')}{rng.choice(['', '#', 'b'])} " \
                     f"{rng.choice(['major', 'minor'])}."
        out.append(words.capitalize() + ".")
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
                                   additional_special_tokens=["<|im_start|>", AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS],
                                   model_max_length=4096, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(seed: int = 0):
    from transformers import MusicFlamingoProcessor, WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30,
                                 n_fft=400, return_attention_mask=True)
    return MusicFlamingoProcessor(feature_extractor=fe, tokenizer=build_tokenizer(seed), chat_template=CHAT_TEMPLATE)


def build_config(tokenizer):
    from transformers import AudioFlamingo3EncoderConfig, MusicFlamingoConfig, Qwen2Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    audio = AudioFlamingo3EncoderConfig(num_mel_bins=128, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128, hidden_size=HIDDEN, max_source_positions=1500)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
                       eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = MusicFlamingoConfig(audio_config=audio, text_config=text, audio_token_id=ids[AUDIO_TOKEN],
                                 audio_bos_token_id=ids[AUDIO_BOS], audio_eos_token_id=ids[AUDIO_EOS])
    config.architectures = ["MusicFlamingoForConditionalGeneration"]
    return config, ids


def make_tiny_flamingo(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the model folder (skipped when a complete one is there); returns its path."""
    out = Path(out_dir)
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import GenerationConfig, MusicFlamingoForConditionalGeneration

    processor = build_processor(seed)
    processor.save_pretrained(out)
    config, ids = build_config(processor.tokenizer)
    torch.manual_seed(seed)
    model = MusicFlamingoForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=False, suppress_tokens=sorted(ids.values()))
    model.save_pretrained(out, safe_serialization=True)
    if not list(out.glob("*.safetensors")):
        raise RuntimeError(f"no safetensors weights written to {out}")
    (out / ".complete").write_text(json.dumps({"vocab_size": len(processor.tokenizer), "seed": seed}))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: .venv/bin/python tests/tiny_flamingo.py OUT_DIR")
    print(make_tiny_flamingo(sys.argv[1]))
