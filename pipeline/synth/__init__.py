"""Synthetic media with exactly known ground truth, for tests, benchmarks and the demo."""
from pipeline.synth.bad_inputs import CASES as BAD_INPUT_CASES
from pipeline.synth.bad_inputs import make_bad_inputs
from pipeline.synth.media import av1_encoder, make_audio_only, make_video, random_music, truth_path
from pipeline.synth.music import MusicSpec, render_music

__all__ = ["BAD_INPUT_CASES", "MusicSpec", "av1_encoder", "make_audio_only", "make_bad_inputs",
           "make_video", "random_music", "render_music", "truth_path"]
