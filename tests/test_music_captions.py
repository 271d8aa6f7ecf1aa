"""music_captions: the transformers backend end to end with a tiny random MusicFlamingo, the audio
reaching the model (features, sound-token count = encoder output length, answers that depend on the
audio), weights/endpoint resolution, and the vLLM backend's requests against a real local HTTP server
that speaks the OpenAI chat API (request format, failures -> flagged clips, never lost ones)."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from helpers import small_config
from tiny_flamingo import make_tiny_flamingo

from pipeline.weights import WeightsMissing
from stages.flamingo_backend import MAX_ANSWER_CHARS, clean_text, wav_base64
from stages.music_captions import MusicCaptions, load_prompts

SR, N = 16000, 160000
PROMPT_IDS = {"caption", "theory", "genre_mood", "instruments"}


def sine(freq: float = 440.0) -> np.ndarray:
    t = np.arange(N) / SR
    return (0.4 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def noise(seed: int = 0) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal(N)).clip(-1, 1).astype(np.float32)


def clip_row(key: str, audio) -> dict:
    return {"key": key, "meta": {"clip": {"index": 0, "is_last": False}, "source": {"source_id": key}, "flags": {}},
            "audio16": audio}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_flamingo(tmp_path_factory.mktemp("tiny_flamingo"))


@pytest.fixture(scope="module")
def tf_stage(tiny):
    config = small_config(**{"captions.backend": "transformers", "captions.weights": str(tiny),
                             "captions.max_tokens": "6"})
    updates = MusicCaptions.prepare(config)
    assert updates == {"captions.weights": str(tiny.resolve())}
    stage = MusicCaptions(config)
    stage.setup()
    return stage


# --- transformers backend -------------------------------------------------------------------------

def test_transformers_backend_end_to_end(tf_stage):
    rows = list(tf_stage.process([clip_row("a_0", sine()), clip_row("b_0", noise())]))
    assert [r["key"] for r in rows] == ["a_0", "b_0"]
    for row in rows:
        cap = row["meta"]["captions"]
        assert set(cap) == {"answers", "model", "backend", "prompts", "errors"}
        assert cap["model"] == "nvidia/music-flamingo-2601-hf" and cap["backend"] == "transformers"
        assert cap["prompts"] == "music_caption.v1"
        assert set(cap["answers"]) == PROMPT_IDS and cap["errors"] == {}
        for text in cap["answers"].values():
            assert isinstance(text, str) and 0 < len(text) <= MAX_ANSWER_CHARS and text == clean_text(text)
        assert "caption_failed" not in row["meta"]["flags"]
        json.dumps(row["meta"])  # JSON-able
        assert row["audio16"] is not None  # the stage reads audio16; the runner frees it


def test_bad_audio_is_flagged_not_lost(tf_stage):
    rows = list(tf_stage.process([clip_row("x_0", None), clip_row("y_0", sine(220.0)),
                                  clip_row("z_0", np.zeros((2, N), np.float32))]))
    assert [r["key"] for r in rows] == ["x_0", "y_0", "z_0"]
    for row in (rows[0], rows[2]):
        assert row["meta"]["flags"]["caption_failed"]
        assert row["meta"]["captions"]["answers"] == {}
        assert set(row["meta"]["captions"]["errors"]) == PROMPT_IDS
    assert set(rows[1]["meta"]["captions"]["answers"]) == PROMPT_IDS


def test_audio_reaches_the_model(tf_stage):
    import torch

    backend = tf_stage.backend
    model = backend.model
    prompt = tf_stage.prompts[0][1]
    batch = backend.inputs([backend.conversation(sine(), prompt), backend.conversation(noise(), prompt)])
    feats, mask, ids = batch["input_features"], batch["input_features_mask"], batch["input_ids"]
    # One 30 s Whisper window per 10 s clip: 128 mel bins x 3000 frames, 1000 of them real (10 ms hop).
    assert tuple(feats.shape) == (2, 128, 3000) and feats.dtype == model.dtype
    assert mask.sum(-1).tolist() == [1000, 1000]
    # The processor inserts exactly as many <sound> tokens as the encoder yields embeddings for the clip.
    n_sound = (ids == model.config.audio_token_id).sum(-1)
    _, post = model.model.audio_tower._get_feat_extract_output_lengths(mask.sum(-1).long())
    assert n_sound.tolist() == post.tolist() == [250, 250]
    assert ((ids == model.config.audio_bos_token_id).sum(-1) == 1).all()
    assert ((ids == model.config.audio_eos_token_id).sum(-1) == 1).all()
    with torch.no_grad():
        emb = model.get_audio_features(feats, mask, ids).pooler_output
        assert tuple(emb.shape) == (500, model.config.text_config.hidden_size)
        logits = model(**batch).logits[:, -1]
    # Same text, different audio: the audio changes the model's next-token distribution.
    text_ids = [row[row != model.config.audio_token_id] for row in ids]
    assert torch.equal(text_ids[0], text_ids[1])
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)


def test_clean_text():
    assert clean_text("  A calm\x07 piano\u202e piece\x1b[31m in C major.\u2028Slow.\x00 ") == \
        "A calm piano piece[31m in C major.\nSlow."
    long = clean_text("x" * 5000)
    assert len(long) == MAX_ANSWER_CHARS and long.endswith("…")


# --- prepare: endpoint / weights ------------------------------------------------------------------

def test_prepare_vllm_without_endpoint():
    with pytest.raises(WeightsMissing, match=r"no MusicFlamingo endpoint configured: set "
                                             r"captions.endpoint=http://HOST:PORT/v1 or captions.backend=transformers"):
        MusicCaptions.prepare(small_config())
    assert MusicCaptions.prepare(small_config(**{"captions.endpoint": "http://127.0.0.1:1/v1"})) == {}


def test_prepare_transformers_without_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsMissing, match="nvidia/music-flamingo-2601-hf is not in the Hugging Face cache"):
        MusicCaptions.prepare(small_config(**{"captions.backend": "transformers"}))
    with pytest.raises(WeightsMissing, match="is not a model folder"):
        MusicCaptions.prepare(small_config(**{"captions.backend": "transformers", "captions.weights": str(tmp_path)}))


def test_prompts_file():
    system, prompts = load_prompts("music_caption.v1")
    assert system and {pid for pid, _ in prompts} == PROMPT_IDS
    with pytest.raises(ValueError, match="does not exist"):
        MusicCaptions.prepare(small_config(**{"captions.prompts": "nope.v9", "captions.endpoint": "http://x/v1"}))


# --- vLLM backend against a real local OpenAI-style HTTP server -----------------------------------

CANNED = "A gentle piano\x07 ballad at 72 BPM in C major,\u202e with soft strings."


class FakeChatServer:
    """POST /v1/chat/completions: records each JSON body and answers `CANNED` (or `status`)."""

    def __init__(self, status: int = 200, fail_prompt: str | None = None, delay: float = 0.2):
        self.bodies: list[dict] = []
        self.status, self.fail_prompt, self.delay = status, fail_prompt, delay
        self.active = self.peak = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append(body)
                    outer.active += 1
                    outer.peak = max(outer.peak, outer.active)
                time.sleep(outer.delay)
                with outer.lock:
                    outer.active -= 1
                text = body["messages"][-1]["content"][-1]["text"]
                status = 500 if (outer.status != 200 or text == outer.fail_prompt) else 200
                if self.path != "/v1/chat/completions":
                    status = 404
                payload = {"error": {"message": "boom"}} if status != 200 else {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": CANNED}}],
                    "usage": {"prompt_tokens": 300, "completion_tokens": 12, "total_tokens": 312}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def vllm_stage(endpoint: str, **extra) -> MusicCaptions:
    stage = MusicCaptions(small_config(**{"captions.endpoint": endpoint, "captions.model": "tiny-mf",
                                          "captions.retries": "0", "captions.timeout_s": "10", **extra}))
    stage.setup()
    return stage


def decode_wav(b64: str) -> tuple[int, int, np.ndarray]:
    with wave.open(io.BytesIO(base64.b64decode(b64))) as w:
        assert w.getsampwidth() == 2
        return w.getframerate(), w.getnchannels(), np.frombuffer(w.readframes(w.getnframes()), "<i2")


def test_vllm_request_format():
    clips = [sine(), noise(1)]
    with FakeChatServer() as server:
        stage = vllm_stage(server.url)
        rows = list(stage.process([clip_row("a_0", clips[0]), clip_row("b_0", clips[1])]))
    system, prompts = load_prompts("music_caption.v1")
    assert len(server.bodies) == 2 * len(prompts)
    assert server.peak > 1  # requests in flight together, not one after another
    seen = set()
    for body in server.bodies:
        assert body["model"] == "tiny-mf" and body["max_tokens"] == 512 and body["temperature"] == 0.2
        sys_msg, user = body["messages"]
        assert sys_msg == {"role": "system", "content": system}
        audio, text = user["content"]
        assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav"
        rate, channels, pcm = decode_wav(audio["input_audio"]["data"])
        assert (rate, channels, len(pcm)) == (SR, 1, N)
        which = min(range(2), key=lambda i: np.abs(pcm / 32767.0 - clips[i]).max())
        assert np.abs(pcm / 32767.0 - clips[which]).max() < 1e-4
        assert text["type"] == "text" and text["text"] in dict(prompts).values()
        seen.add((which, text["text"]))
    assert len(seen) == 2 * len(prompts)  # every prompt for every clip
    for row in rows:
        cap = row["meta"]["captions"]
        assert cap["backend"] == "vllm" and cap["model"] == "tiny-mf" and cap["errors"] == {}
        assert cap["answers"] == {pid: "A gentle piano ballad at 72 BPM in C major, with soft strings." for pid in PROMPT_IDS}
        assert "caption_failed" not in row["meta"]["flags"]


def test_vllm_partial_failure_keeps_the_answers():
    _, prompts = load_prompts("music_caption.v1")
    theory = dict(prompts)["theory"]
    with FakeChatServer(fail_prompt=theory, delay=0.0) as server:
        (row,) = vllm_stage(server.url).process([clip_row("a_0", sine())])
    cap = row["meta"]["captions"]
    assert set(cap["answers"]) == PROMPT_IDS - {"theory"}
    assert list(cap["errors"]) == ["theory"] and cap["errors"]["theory"].startswith("http_500")
    assert "caption_failed" not in row["meta"]["flags"]


def test_vllm_server_error_flags_every_clip():
    with FakeChatServer(status=500, delay=0.0) as server:
        rows = list(vllm_stage(server.url).process([clip_row(f"c_{i}", sine(200 + 100 * i)) for i in range(3)]))
    assert [r["key"] for r in rows] == ["c_0", "c_1", "c_2"]
    for row in rows:
        assert row["meta"]["flags"]["caption_failed"].startswith("http_500")
        assert row["meta"]["captions"]["answers"] == {} and set(row["meta"]["captions"]["errors"]) == PROMPT_IDS


def test_vllm_closed_port_flags_every_clip():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = list(vllm_stage(f"http://127.0.0.1:{port}/v1").process([clip_row("a_0", sine()), clip_row("b_0", noise())]))
    assert [r["key"] for r in rows] == ["a_0", "b_0"]
    for row in rows:
        assert row["meta"]["flags"]["caption_failed"].startswith("unavailable")


def test_wav_roundtrip_clips_range():
    rate, channels, pcm = decode_wav(wav_base64(np.array([0.0, 0.5, -0.5, 2.0, -2.0, np.nan], np.float32)))
    assert (rate, channels) == (SR, 1) and pcm.tolist() == [0, 16384, -16384, 32767, -32767, 0]
