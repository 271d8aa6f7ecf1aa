"""Where benchmarks leave their figures: bench/results/<name>.json (everything measured) and
<name>.md (the table a reader looks at), committed with the code they measured."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, res: dict, markdown: str, folder: Path = RESULTS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    print(markdown)
