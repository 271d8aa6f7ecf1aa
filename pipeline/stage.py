"""The stage contract: every pipeline step is a small class with declared resources,
a `setup()` that loads heavy state once per worker, and one batch method.

Rows are plain dicts. Every row carries:
  key       str  — `<source_id>` for sources, `<source_id>_<start_ms>` for clips
  meta      dict — everything JSON-able accumulated so far (source, probe, window, attributes...)
and any number of numpy arrays (frames, audio). Each stage declares the arrays it `consumes`; the
runner drops an array right after the last stage of the pipeline that consumes it.

A stage never raises for one bad item: it yields a `Reject` for it instead, and the runner
turns rejects into small side rows that travel with the data to the writer (pipeline/carry.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

Row = dict[str, Any]


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. `pool_size=None` runs the stage as stateless tasks;
    an int runs an actor pool of up to that many actors (for stages with loaded state)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    pool_size: int | None = None
    batch_size: int = 8


@dataclass
class Reject:
    """One input or clip that leaves the pipeline, with a machine-readable reason."""

    stage: str
    reason: str  # short snake_case code, e.g. "no_audio_stream"
    detail: str  # human sentence with the specifics
    source_id: str = ""
    source_path: str = ""
    key: str = ""  # clip key for clip-level rejects, source key otherwise
    level: str = "source"  # "source" or "clip"
    clip_index: int = -1
    is_last_clip: bool = False
    # A transient failure (network, throttling, store down) that outlasted the retries: the input
    # is not finished; a rerun tries it again. Permanent rejects are final.
    retryable: bool = False

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def for_row(cls, stage: str, row: Row, reason: str, detail: str) -> "Reject":
        """A reject for a row already flowing through the pipeline (source or clip)."""
        meta = row.get("meta", {})
        clip = meta.get("clip")
        return cls(
            stage=stage,
            reason=reason,
            detail=detail[:500],
            source_id=meta.get("source", {}).get("source_id", ""),
            source_path=meta.get("source", {}).get("path", ""),
            key=row.get("key", ""),
            level="clip" if clip else "source",
            clip_index=clip["index"] if clip else -1,
            is_last_clip=bool(clip and clip.get("is_last")),
        )


class Stage:
    """Base class. Subclasses set `name`, `resources`, and implement `process`."""

    name: ClassVar[str] = "stage"
    resources: Resources = Resources()
    # Array fields this stage reads; the runner frees each after its last consumer.
    consumes: ClassVar[tuple[str, ...]] = ()
    # Array fields this stage adds; one that no later stage consumes is freed right after it.
    produces: ClassVar[tuple[str, ...]] = ()
    # The writer sees reject and statistics rows too (to commit them); other stages never do.
    takes_side_rows: ClassVar[bool] = False

    def __init__(self, config: Any, context: "RunContext | None" = None):
        self.config = config
        self.context = context

    @classmethod
    def prepare(cls, config: Any) -> dict[str, Any]:
        """Driver side, once per run, before any worker starts: resolve model weights and return
        config updates (dotted key -> value) that point the workers at local files. Raises
        `pipeline.weights.WeightsMissing` when the stage has no weights to run with."""
        return {}

    def setup(self) -> None:
        """Load models or other heavy state. Called once per worker before any batch."""

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        """Yield one output row per accepted item (or several, for 1->N stages) and a
        `Reject` per item that cannot go on."""
        raise NotImplementedError

    def count(self, name: str, n: int = 1) -> None:
        """A run-wide counter (e.g. "composer.llm"), carried with the data into the run record."""
        counters = self.__dict__.setdefault("_counters", {})
        counters[name] = counters.get(name, 0) + n

    def take_counters(self) -> dict[str, int]:
        counters, self._counters = self.__dict__.get("_counters", {}), {}
        return counters

    def run(self, rows: list[Row], drop: tuple[str, ...] = ()) -> Iterator[Row | Reject]:
        """`process`, then free the arrays in `drop` that no later stage reads."""
        for item in self.process(rows):
            if isinstance(item, dict):
                for name in drop:
                    item.pop(name, None)
            yield item


@dataclass
class RunContext:
    """What a stage may need to know about the run beyond its own config."""

    output_dir: str
    run_id: str
    done_keys: frozenset[str] = field(default_factory=frozenset)  # clips finished by earlier runs
