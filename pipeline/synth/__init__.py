"""Synthetic media with exactly known ground truth, for tests, benchmarks and the demo."""
from pipeline.synth.music import MusicSpec, render_music

__all__ = ["MusicSpec", "render_music"]
