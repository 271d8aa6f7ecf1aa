"""The pipeline is a plain list of stages, built here from the config."""
from __future__ import annotations

import importlib

from pipeline.config import Config
from pipeline.stage import RunContext, Stage

# name -> "module:Class". Heavy imports happen only when a stage is built.
STAGES = {
    "probe": "stages.probe:Probe",
    "segment": "stages.segment:Segment",
    "music_dsp": "stages.music_dsp:MusicDSP",
    "visual_rhythm": "stages.visual_rhythm:VisualRhythm",
    "clip_embed": "stages.clip_embed:ClipEmbed",
    "vae_latents": "stages.vae_latents:VaeLatents",
    "music_captions": "stages.music_captions:MusicCaptions",
    "prompt_fusion": "stages.prompt_fusion:PromptFusion",
    "template_prompts": "stages.template_prompts:TemplatePrompts",
    "writer": "shards.writer:Writer",
}
# Stages every run needs at these ends; the middle is the user's to choose.
FIRST, SECOND, LAST = "probe", "segment", "writer"


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_pipeline(config: Config, context: RunContext | None = None) -> list[Stage]:
    names = list(config.stages)
    if names[:2] != [FIRST, SECOND] or names[-1] != LAST:
        raise ValueError(f"stages must start with {FIRST}, {SECOND} and end with {LAST}; got {names}")
    return [stage_class(name)(config, context) for name in names]


def drops_after(names: list[str]) -> dict[str, tuple[str, ...]]:
    """For each stage, the arrays it is the last consumer of (freed right after it); an array no
    stage of this pipeline reads is freed right after the stage that makes it."""
    last: dict[str, str] = {}
    for name in names:
        for field in stage_class(name).produces:
            last.setdefault(field, name)
        for field in stage_class(name).consumes:
            last[field] = name
    return {name: tuple(f for f, n in last.items() if n == name) for name in names}
