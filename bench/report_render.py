"""Render `python -m shards.browse OUT report` in a real headless browser and save a screenshot,
to look at the page as a user sees it (plots drawn, table laid out, nothing fetched from the net).

    .venv/bin/python -m bench.report_render [OUT] [--png bench/results/browse_report_screenshot.png]

OUT defaults to a fresh synthetic 1M-row index (bench/browse_scale.py). Needs `chromium`
(Debian: apt-get install -y chromium)."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 4000) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        raise SystemExit("no chromium on PATH (Debian: apt-get install -y chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--screenshot={png.resolve()}", f"--window-size={width},{height}",
                        html.resolve().as_uri()], check=True, capture_output=True, timeout=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="output folder (default: a synthetic 1M-row index)")
    ap.add_argument("--png", default=str(RESULTS / "browse_report_screenshot.png"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out
        if out is None:
            from bench.browse_scale import make_synthetic

            out = str(Path(tmp) / "out")
            make_synthetic(Path(out), 1_000_000, 100)
        html = Path(tmp) / "report.html"
        from shards.browse.__main__ import main as browse

        if browse([out, "report", str(html)]) != 0:
            return 1
        screenshot(html, Path(args.png))
    print(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
