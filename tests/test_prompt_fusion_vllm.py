"""prompt_fusion end to end through a REAL vLLM OpenAI-compatible server on CPU (the session's
`qwen_server`: a tiny random-weight Qwen3). Random weights write nonsense, but structured output
must still hold: every finished answer is JSON valid against the schema we sent, and every clip
leaves the stage with prompts (the LLM's, or the template's with the fallback flag)."""
from __future__ import annotations

import copy
import json
import subprocess
import urllib.request

import jsonschema
import pytest
from test_prompt_fusion import ESCAPE, rows, stage_for

from prompts.fusion_schema import FUSION_SCHEMA_VERSION, FusedAttributes, Prompts, json_schema
from stages.prompt_fusion import build_messages, load_fusion_template
from stages.template_prompts import load_template

pytestmark = pytest.mark.slow

# What prompt_fusion needs from a vLLM server (production too: put these in the server's args):
# compact JSON (xgrammar otherwise allows any whitespace between tokens, and a model that likes
# whitespace, as random weights do, runs to max_tokens in it) and a context that holds the prompt
# (~1.6-2.3 k tokens with the tiny model's small vocabulary) plus a 1024-token answer.
STRUCTURED = json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})
MIN_CONTEXT = 4096


def _get(server, name: str):
    return server[name] if isinstance(server, dict) else getattr(server, name)


@pytest.fixture(scope="module")
def fusion_server(qwen_server):
    """The session's tiny Qwen3 server, which must be started as prompt_fusion needs it."""
    args = [str(a) for a in qwen_server["server"].args]
    assert "disable_any_whitespace" in " ".join(args), "start the server with STRUCTURED (see above)"
    assert int(args[args.index("--max-model-len") + 1]) >= MIN_CONTEXT, "the prompt plus the answer need MIN_CONTEXT tokens"
    return qwen_server


XGRAMMAR_CHECK = """
import json, sys, xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string as accepts
schema, words = json.loads(sys.argv[1]), json.loads(sys.argv[2])
grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
print(json.dumps([accepts(grammar, json.dumps(w)) for w in words]))
"""


def test_xgrammar_reads_the_chord_pattern_as_pydantic_does():
    """xgrammar (the grammar vLLM constrains decoding with) and pydantic (what validates the
    answer) accept exactly the same chord symbols."""
    from conftest import VLLM_PYTHON
    from pydantic import TypeAdapter, ValidationError

    from prompts.fusion_schema import Chord

    words = ["C", "F#m", "Bbmaj7", "Esus4", "Cadd9", "Am7/G", "G13", "Cdim7", "Bb042", "C123", "H", "Cmajmaj",
             "c", "Am7/G/B", "C#m7add11/Ebb", ""]
    schema = json_schema()["properties"]["attributes"]["properties"]["chord_progression"]["items"]
    proc = subprocess.run([str(VLLM_PYTHON), "-c", XGRAMMAR_CHECK, json.dumps(schema), json.dumps(words)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapter = TypeAdapter(Chord)

    def pydantic_accepts(word):
        try:
            adapter.validate_python(word)
            return True
        except ValidationError:
            return False

    assert json.loads(proc.stdout) == [pydantic_accepts(w) for w in words]


def token_count(base_url: str, model: str, messages: list[dict]) -> tuple[int, int]:
    """(prompt tokens, the server's max_model_len) from vLLM's /tokenize."""
    root = base_url.rstrip("/").removesuffix("/v1")
    body = json.dumps({"model": model, "messages": messages, "add_generation_prompt": True,
                       "chat_template_kwargs": {"enable_thinking": False}}).encode()
    req = urllib.request.Request(f"{root}/tokenize", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        out = json.loads(resp.read())
    return out["count"], out["max_model_len"]


def clips() -> list[dict]:
    batch = rows(3)
    batch[1]["meta"]["captions"] = {"answers": {"caption": "Calm piano ballad in A minor at 70 BPM, Am F C G."},
                                    "model": "music-flamingo-test"}
    batch[2]["meta"]["source"]["path"] = f"/videos/{ESCAPE}.mp4"
    batch[2]["meta"]["captions"] = {"answers": {"caption": ESCAPE * 3}, "model": "music-flamingo-test"}
    return batch


def test_prompt_fusion_through_a_real_vllm_server(fusion_server, tmp_path):
    base_url, model = _get(fusion_server, "base_url"), _get(fusion_server, "model")
    batch = clips()
    system, user = load_fusion_template("fusion.v1")
    messages = [build_messages(r["meta"], system, user) for r in batch]
    counts = [token_count(base_url, model, m) for m in messages]
    context = counts[0][1]
    max_tokens = min(1024, context - max(c for c, _ in counts) - 8)  # the answer must fit the tiny context
    assert max_tokens >= 256, f"prompts of {[c for c, _ in counts]} tokens leave too little of {context}"
    overrides = {"llm.model": model, "llm.max_tokens": str(max_tokens), "llm.timeout_s": "600", "llm.attempts": "2"}
    schema = json_schema()

    # 1) The stage's own requests, greedy (so the outcome is fixed; vLLM's CPU sampler crashes on a
    # per-request seed), straight through its client: random weights, yet every answer is finished
    # JSON that is valid against the schema we sent.
    stage = stage_for(tmp_path / "raw", base_url, **{**overrides, "llm.temperature": "0"})
    results = stage.client.chat_many([stage._request(m) for m in messages])
    stage.close()
    for r in results:
        assert r.ok, r.error
        assert r.finish_reason == "stop", (r.finish_reason, r.completion_tokens, r.text[-200:])
        jsonschema.validate(json.loads(r.text, strict=False), schema)  # xgrammar lets raw control characters into strings
        assert r.text.startswith('{"attributes":{')  # compact: no whitespace between tokens

    # 2) The stage: every clip comes out, with LLM prompts or the template's and the flag.
    stage = stage_for(tmp_path / "stage", base_url, **overrides)
    out = list(stage.run(copy.deepcopy(batch)))
    stage.close()
    assert [o["key"] for o in out] == [r["key"] for r in batch]
    composers = []
    for o in out:
        meta, src = o["meta"], o["meta"]["prompt_source"]
        composers.append(src["composer"])
        if src["composer"] == "llm":
            assert src == {"composer": "llm", "model": model, "template": "fusion.v1"}
            Prompts.model_validate(meta["prompts"])
            attrs = dict(meta["fused"]["attributes"])
            assert attrs.pop("key") == "C major" and attrs["tempo_bpm"] == 120.0  # the measurements win
            FusedAttributes.model_validate({**attrs, "chord_progression": attrs["chord_progression"][:16]})
            assert meta["fused"]["provenance"]["schema_version"] == FUSION_SCHEMA_VERSION
            assert 1 <= meta["fused"]["provenance"]["attempts"] <= 2 and "llm_fallback" not in meta["flags"]
        else:
            assert src["composer"] == "template" and src["fallback_reason"] == "invalid_answer", src
            assert src["attempts"] == 2 and meta["flags"]["llm_fallback"] == "invalid_answer"
            # what random weights get wrong: the answer ran past max_tokens, or a string was blank
            assert "cut at max_tokens" in src["detail"] or src["detail"].startswith("schema:"), src["detail"]
            assert set(meta["prompts"]) == set(load_template("template.v1"))
    print("composers:", composers, "raw finish:", [r.finish_reason for r in results],
          "tokens:", [r.completion_tokens for r in results], "max_tokens:", max_tokens)
