"""Before a run: every stage resolves its weights on the driver; a stage without weights fails the
run or, where its config says `on_missing: skip`, leaves the pipeline with the reason recorded."""
from __future__ import annotations

from pipeline.config import Config, _set
from pipeline.registry import stage_class
from pipeline.weights import WeightsMissing

# Stages whose settings live under another section name.
SECTIONS = {"music_captions": "captions", "prompt_fusion": "llm"}


def prepare_stages(config: Config) -> tuple[Config, dict[str, str]]:
    """The config the workers run (local weight paths filled in, skipped stages removed) and
    {stage: why it was skipped}. Raises WeightsMissing for a stage set to fail."""
    updates: dict[str, object] = {}
    skipped: dict[str, str] = {}
    for name in config.stages:
        try:
            updates.update(stage_class(name).prepare(config))
        except WeightsMissing as exc:
            section = SECTIONS.get(name, name)
            if getattr(getattr(config, section, None), "on_missing", "fail") != "skip":
                raise WeightsMissing(f"stage {name} cannot run: {exc} (or set {section}.on_missing=skip)") from exc
            skipped[name] = str(exc)
    data = config.model_dump()
    for key, value in updates.items():
        _set(data, key.split("."), value)
    data["stages"] = [s for s in config.stages if s not in skipped]
    return Config.model_validate(data), skipped
