"""Config: presets, key=value overrides, and errors that name the problem."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.build import main
from pipeline.config import load_config
from pipeline.registry import build_pipeline, drops_after


def test_overrides_are_typed_and_nested():
    cfg = load_config("demo", ["writer.samples_per_shard=3", "segment.snap_seconds=1.5", "runner.engine=loop"])
    assert cfg.writer.samples_per_shard == 3 and cfg.segment.snap_seconds == 1.5 and cfg.runner.engine == "loop"
    assert load_config(None, []).clip_seconds == 10.0


def test_unknown_keys_and_bad_values_are_refused():
    with pytest.raises(ValidationError, match="samples_per_shrd"):
        load_config(None, ["writer.samples_per_shrd=3"])
    with pytest.raises(ValidationError, match="engine"):
        load_config(None, ["runner.engine=spark"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["writer"])


def test_pipeline_is_a_plain_list_in_config_order():
    cfg = load_config(None, [])
    assert [s.name for s in build_pipeline(cfg)] == cfg.stages
    with pytest.raises(ValueError, match="must start with probe, segment"):
        build_pipeline(load_config(None, ["stages=[segment, writer]"]))
    with pytest.raises(ValueError, match="unknown stage"):
        build_pipeline(load_config(None, ["stages=[probe, segment, dance, writer]"]))


def test_cli_reports_a_bad_config_without_a_traceback(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "writer.nope=1"])
    assert exit_info.value.code == 2 and "bad configuration" in capsys.readouterr().err


def test_arrays_are_freed_after_their_last_consumer():
    drops = drops_after(load_config(None, []).stages)
    assert set(drops["visual_rhythm"]) == {"onset_25hz", "beat_25hz", "motion_25hz"}
    assert {"flac", "jpg"} <= set(drops["writer"]) and "frames" in drops["clip_embed"] and "audio48" in drops["vae_latents"]
    # audio16 lives until MusicFlamingo has heard it; without that stage, music_dsp is its last reader.
    assert "audio16" in drops["music_captions"] and "audio16" not in drops["music_dsp"]
    without = [s for s in load_config(None, []).stages if s != "music_captions"]
    assert "audio16" in drops_after(without)["music_dsp"]
    assert drops["probe"] == drops["segment"] == ()  # segment's arrays all have readers downstream
