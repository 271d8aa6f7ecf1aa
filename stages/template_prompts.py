"""template_prompts: deterministic text prompts at several control levels from the measured
attributes. The LLM prompt-fusion stage replaces it as the default when an endpoint is configured."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable

from pipeline.stage import Reject, Resources, Row, Stage

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


@lru_cache(maxsize=8)
def load_template(name: str) -> dict[str, str]:
    """{level: format string} from prompts/<name>.txt, in file order."""
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.exists():
        raise FileNotFoundError(f"prompt template {name!r} not found at {path}")
    levels = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            level, text = line.split(":", 1)
            levels[level.strip()] = text.strip()
    return levels


def chord_symbol(label: str) -> str:
    """Harte 'A:min' -> 'Am', 'C:maj' -> 'C'."""
    root, _, quality = label.partition(":")
    return root + ("m" if quality.startswith("min") else "")


def progression(chords: list[dict], limit: int = 4) -> str:
    names: list[str] = []
    for chord in chords:
        if chord["label"] == "N":
            continue
        name = chord_symbol(chord["label"])
        if not names or names[-1] != name:
            names.append(name)
    return "-".join(names[:limit]) if names else "a sustained drone"


def _band(value: float, bands: list[tuple[float, str]], last: str) -> str:
    return next((word for limit, word in bands if value < limit), last)


def describe(meta: dict) -> dict[str, str]:
    """Words for the template fields, from measured values only."""
    music, visual = meta.get("music", {}), meta.get("visual", {})
    tempo = float(music.get("tempo_bpm") or 0.0)
    loud = float(music.get("loudness_dbfs", -30.0))
    return {
        "mood": "bright" if music.get("mode") == "major" else "dark",
        "tempo": f"{tempo:.0f}",
        "tempo_word": _band(tempo, [(76, "slow"), (108, "moderate"), (140, "upbeat")], "fast"),
        "key": music.get("key", "an unknown key"),
        "progression": progression(music.get("chords", [])),
        "dynamics": _band(loud, [(-30, "soft"), (-18, "moderate dynamics")], "loud"),
        "cut_phrase": _band(visual.get("cuts_per_minute", 0.0), [(0.1, "one continuous shot"), (12, "slow cuts"), (30, "regular cuts")], "rapid cuts"),
        "motion_phrase": _band(visual.get("motion_mean", 0.0), [(0.01, "still images"), (0.04, "gentle motion")], "lots of motion"),
    }


class TemplatePrompts(Stage):
    name = "template_prompts"
    resources = Resources(num_cpus=0.25, batch_size=32)

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        template = self.config.prompts.template
        levels = load_template(template)
        for row in rows:
            fields = describe(row["meta"])
            row["meta"]["prompts"] = {level: text.format(**fields) for level, text in levels.items()}
            row["meta"]["prompt_source"] = {"composer": "template", "template": template}
            yield row
