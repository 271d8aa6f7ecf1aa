"""Throughput of structured-output (JSON-schema) chat requests shaped like prompt fusion's, through
`LLMClient` against a real vLLM OpenAI server: requests/s and completion tokens/s of a concurrent
client (max_concurrency 8 and 32) as a ratio to one sequential client, measured in the same run on
the same server.

    python -m bench.llm_throughput                     # CPU: the tiny random Qwen3 (tests/tiny_qwen.py)
    python -m bench.llm_throughput --gpu --model Qwen/Qwen3-8B --python /path/to/vllm-env/bin/python

The GPU mode starts vLLM with `--load-format dummy` (random weights, the real architecture and
sizes): it needs the model's config.json and tokenizer locally (an HF cache or a folder), not its
weights. Random weights emit random (schema-valid) JSON, so token counts per answer differ from a
trained model's; the figures measure the serving path, not answer quality.
Writes bench/results/llm_throughput_<device>.{md,json}."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pipeline.llm.client import ChatRequest, LLMClient  # noqa: E402
from pipeline.llm.server import VllmServer  # noqa: E402

SYSTEM = ("You turn measured music features of a video clip, a caption of its audio and visual tags into "
          "normalised attributes and a text-to-music prompt. Answer with JSON only, following the schema. "
          "Prefer the measured tempo and key over the caption when they disagree.")
SCHEMA = {
    "type": "object",
    "properties": {
        "genre": {"type": "string", "enum": ["rock", "jazz", "ambient", "orchestral", "electronic", "pop", "folk"]},
        "bpm": {"type": "integer", "minimum": 40, "maximum": 220},
        "key": {"type": "string", "maxLength": 12},
        "mood": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "instruments": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "vocals": {"type": "boolean"},
        "prompt": {"type": "string", "maxLength": 200},
    },
    "required": ["genre", "bpm", "key", "mood", "instruments", "vocals", "prompt"],
    "additionalProperties": False,
}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def fusion_requests(n: int, max_tokens: int) -> list[ChatRequest]:
    out = []
    for i in range(n):
        facts = {"tempo_bpm": 70 + (i * 7) % 110, "key": ["A minor", "C major", "F# minor", "Eb major"][i % 4],
                 "chords": ["Am", "F", "C", "G"][: 2 + i % 3], "beat_strength": round(0.3 + (i % 5) * 0.1, 2),
                 "caption": f"A {['calm', 'driving', 'bright', 'dark'][i % 4]} piece with piano, strings and soft drums.",
                 "visual_tags": ["sunset", "city", "ocean", "forest", "night"][i % 5: i % 5 + 2],
                 "cuts_per_minute": 8 + i % 13}
        out.append(ChatRequest([{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": json.dumps(facts)}],
                               max_tokens=max_tokens, temperature=0.7, top_p=0.8, json_schema=SCHEMA,
                               extra_body={**NO_THINK, "top_k": 20}))
    return out


def measure(base_url: str, model: str, requests: list[ChatRequest], concurrency: int) -> dict:
    client = LLMClient(base_url, model, max_concurrency=concurrency, timeout_s=600, retries=0)
    client.chat_many(requests[:2])  # warm the connection pool
    t0 = time.perf_counter()
    results = client.chat_many(requests)
    wall = time.perf_counter() - t0
    client.close()
    ok = [r for r in results if r.ok]
    valid = 0
    for r in ok:
        try:
            json.loads(r.text, strict=False)
            valid += 1
        except ValueError:
            pass
    tokens = sum(r.completion_tokens for r in ok)
    lat = sorted(r.latency_s for r in ok) or [0.0]
    return {"concurrency": concurrency, "requests": len(requests), "ok": len(ok), "valid_json": valid,
            "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
            "completion_tokens_per_s": round(tokens / wall, 1), "completion_tokens": tokens,
            "mean_completion_tokens": round(tokens / max(1, len(ok)), 1),
            "latency_p50_s": round(lat[len(lat) // 2], 3), "latency_max_s": round(lat[-1], 3),
            "errors": sorted({r.error_kind for r in results if not r.ok})}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="a real model id with --load-format dummy on CUDA")
    ap.add_argument("--model", default="Qwen/Qwen3-8B", help="GPU mode: HF id or folder (config + tokenizer)")
    ap.add_argument("--python", default=str(ROOT / ".venv-vllm/bin/python"), help="interpreter with vllm")
    ap.add_argument("--requests", type=int, default=None, help="per measurement (default 64 CPU, 256 GPU)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--work", default=str(ROOT / "bench/work/llm"))
    args = ap.parse_args(argv)

    ws = '{"backend": "xgrammar", "disable_any_whitespace": true}'
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        device = torch.cuda.get_device_name(0)
        tag = "gpu_" + device.lower().replace("nvidia", "").strip().replace(" ", "-")
        model_path, served = args.model, "bench-model"
        server_args = ["--load-format", "dummy", "--max-model-len", str(args.max_model_len or 4096),
                       "--served-model-name", served, "--structured-outputs-config", ws]
        env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        n = args.requests or 256
    else:
        from tiny_qwen import build_in_subprocess

        device, tag = f"CPU ({platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores)", "cpu"
        model_path = str(build_in_subprocess(args.python, Path(args.work) / "tiny-qwen3"))
        served = "tiny-qwen3"
        server_args = ["--max-model-len", str(args.max_model_len or 2048), "--dtype", "float32",
                       "--gpu-memory-utilization", "0.1", "--served-model-name", served,
                       "--structured-outputs-config", ws]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        n = args.requests or 64

    Path(args.work).mkdir(parents=True, exist_ok=True)
    server = VllmServer(model_path, python=args.python, args=server_args, env=env, startup_timeout_s=900,
                        log_path=Path(args.work) / f"server_{tag}.log")
    t0 = time.perf_counter()
    server.start()
    try:
        server.wait_ready()
        startup = time.perf_counter() - t0
        print(f"server ready in {startup:.0f} s at {server.base_url}", flush=True)
        requests = fusion_requests(n, args.max_tokens)
        rows = [measure(server.base_url, served, requests, 1)]
        print(rows[-1], flush=True)
        for c in args.concurrency:
            rows.append(measure(server.base_url, served, requests, c))
            print(rows[-1], flush=True)
    finally:
        server.stop()
    base = rows[0]
    for r in rows:
        r["requests_per_s_vs_sequential"] = round(r["requests_per_s"] / base["requests_per_s"], 2) if base["requests_per_s"] else None
        r["tokens_per_s_vs_sequential"] = (round(r["completion_tokens_per_s"] / base["completion_tokens_per_s"], 2)
                                           if base["completion_tokens_per_s"] else None)
    report = {"device": device, "model": args.model if args.gpu else "tiny random Qwen3 (tests/tiny_qwen.py)",
              "load_format": "dummy" if args.gpu else "safetensors (random)", "server_args": server_args,
              "server_startup_s": round(startup, 1), "max_tokens": args.max_tokens, "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"llm_throughput_{tag}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# LLM throughput: structured fusion-like requests ({device})", "",
             f"Model: {report['model']}; vLLM OpenAI server started in {report['server_startup_s']} s; "
             f"{n} requests per row, JSON schema (xgrammar, no free whitespace), thinking off, "
             f"max_tokens {args.max_tokens}. Sequential = one request in flight; ratios are to it, same run.", "",
             "| in flight | ok | valid JSON | wall s | req/s | compl. tok/s | mean tok/answer | p50 latency s | req/s vs seq. | tok/s vs seq. |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['ok']}/{r['requests']} | {r['valid_json']} | {r['wall_s']} | "
                     f"{r['requests_per_s']} | {r['completion_tokens_per_s']} | {r['mean_completion_tokens']} | "
                     f"{r['latency_p50_s']} | {r['requests_per_s_vs_sequential']} | {r['tokens_per_s_vs_sequential']} |")
    lines += ["", "Random weights: answers are schema-valid but meaningless, and their lengths vary; the figures "
              "measure the serving path (batching, structured-output decoding, client concurrency)."]
    if not args.gpu:
        lines.append("On 2 shared CPU cores the tiny model's cost is mostly per-step overhead, so batching gains "
                     "say little about a GPU with Qwen3-8B; run `--gpu` there for that.")
    (out / f"llm_throughput_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
