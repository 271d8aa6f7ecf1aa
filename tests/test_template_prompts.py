"""template_prompts: deterministic prompts at several control levels from measured attributes."""
from __future__ import annotations

from stages.template_prompts import TemplatePrompts, describe, load_template, progression

from helpers import small_config

META = {
    "music": {"tempo_bpm": 128.4, "key": "A minor", "mode": "minor", "loudness_dbfs": -12.0,
              "chords": [{"label": "A:min"}, {"label": "A:min"}, {"label": "F:maj"}, {"label": "N"}, {"label": "C:maj"}, {"label": "G:maj"}, {"label": "E:min"}]},
    "visual": {"cuts_per_minute": 36.0, "motion_mean": 0.002},
}


def test_levels_add_control_in_order():
    (row,) = list(TemplatePrompts(small_config()).run([{"key": "k", "meta": {**META}}]))
    prompts = row["meta"]["prompts"]
    assert list(prompts) == list(load_template("template.v1"))
    assert [len(p) for p in prompts.values()] == sorted(len(p) for p in prompts.values())
    assert prompts["minimal"] == "dark instrumental music"
    assert "128 BPM" in prompts["tempo_key"] and "A minor" in prompts["tempo_key"]
    assert "chords Am-F-C-G" in prompts["harmony"] and "loud" in prompts["harmony"]
    assert "rapid cuts" in prompts["video"] and "still images" in prompts["video"]
    assert row["meta"]["prompt_source"] == {"composer": "template", "template": "template.v1"}


def test_words_follow_the_measurements():
    slow_major = describe({"music": {"tempo_bpm": 70, "mode": "major", "loudness_dbfs": -35}, "visual": {}})
    assert (slow_major["mood"], slow_major["tempo_word"], slow_major["dynamics"]) == ("bright", "slow", "soft")
    assert describe({"music": {"tempo_bpm": 150}})["tempo_word"] == "fast"
    assert progression([]) == "a sustained drone"


def test_same_input_same_prompts():
    stage = TemplatePrompts(small_config())
    a = list(stage.run([{"key": "k", "meta": {**META}}]))[0]["meta"]["prompts"]
    b = list(stage.run([{"key": "k", "meta": {**META}}]))[0]["meta"]["prompts"]
    assert a == b
