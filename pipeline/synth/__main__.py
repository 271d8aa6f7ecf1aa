"""python -m pipeline.synth OUT_DIR [--videos N] [--seconds S] [--seed K] [--bad-inputs]

Writes clip_000.mp4 ... with varied tempo, key, mode and shots, each with a .truth.json sidecar.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.synth.bad_inputs import make_bad_inputs
from pipeline.synth.media import make_video


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.synth", description=__doc__.splitlines()[2])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=24.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--bad-inputs", action="store_true",
                    help="also write the awkward-input cases into OUT_DIR/bad_inputs/")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.videos):
        path = args.out_dir / f"clip_{i:03d}.mp4"
        # Seeds spaced apart so clips differ even for consecutive --seed values.
        t = make_video(path, seconds=args.seconds, fps=args.fps, width=args.width,
                       height=args.height, seed=args.seed * 1000 + i)
        m = t["music"]
        print(f"{path}  {t['seconds']:.1f}s  {m['tempo_bpm']:.0f} BPM  {m['key']:<9}  "
              f"{len(t['shots'])} shots  cuts at {', '.join(f'{c:.2f}' for c in t['cut_times'])}")
    if args.bad_inputs:
        for name, path in make_bad_inputs(args.out_dir / "bad_inputs").items():
            print(f"{path}  [{name}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
