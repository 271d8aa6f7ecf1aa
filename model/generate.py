"""Generate music for a video (or a prompt) with a trained Video-Robin checkpoint.

    python model/generate.py --video in.mp4 --prompt "calm piano" --ckpt run/ckpt.pt --out out.mp4
    python model/generate.py --prompt "upbeat rock" --ckpt t2m.pt --out song.wav --seconds 8

CLIP frames come from the pipeline's own decode and ClipEmbed stage code at the CLIP fps used in
training; the latents are decoded by the VAE the training data was encoded with (resolved through
the pipeline config's `vae_latents` section). Weight locations are pipeline config overrides:
`clip_embed.pretrained=/path`, `clip_embed.config_file=...`, `vae_latents.checkpoint=...`, given as
positional `key=value` or `--set key=value`. Missing weights end the run with the download hint;
it never generates from random weights."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python model/generate.py`: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a trainer checkpoint (.pt)")
    ap.add_argument("--out", required=True, help="OUT.mp4 (with --video) or OUT.wav; a wav is always written beside")
    ap.add_argument("--video", help="input video (required for v2m checkpoints)")
    ap.add_argument("--prompt", default="", help='text prompt; "" = unconditional')
    ap.add_argument("--seconds", type=float, help="default: the video's duration capped at the trained length, else 10")
    ap.add_argument("--steps", type=int, help="Euler steps per patch (default: the config's sample_steps)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the config's cfg_scale)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="pipeline config override (weights: clip_embed.pretrained=..., vae_latents.checkpoint=...)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="pipeline config overrides, as --set")
    return ap.parse_args(argv)


def read_checkpoint(path: str):
    import torch

    from model.config import VideoRobinConfig

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("model", "config") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a Video-Robin checkpoint (no {', '.join(missing)})")
    return ckpt, VideoRobinConfig.from_dict(ckpt["config"])


def build_model(ckpt: dict, cfg, use_ema: bool, device):
    """The model with the checkpoint's EMA (or raw) weights, in eval mode."""
    from model.video_robin import VideoRobin

    state = ckpt.get("ema") if use_ema and ckpt.get("ema") else ckpt["model"]
    emb = [v for k, v in state.items() if k.endswith("embed_tokens.weight")]
    vocab = int(emb[0].shape[0]) if emb else None
    if vocab is None:
        from model.text import load_tokenizer

        vocab = load_tokenizer(cfg).vocab_size
    model = VideoRobin(cfg, vocab, load_pretrained=False)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    which = "ema" if state is ckpt.get("ema") else "model"
    return model, which


def pipeline_config(ckpt: dict, user: list[str]):
    """The pipeline config that names the weights: the checkpoint's CLIP and VAE, then the user's overrides."""
    from pipeline.config import load_config

    data = ckpt.get("data") or {}
    base = []
    if data.get("clip_embed"):
        clip = data["clip_embed"]
        base += [f"clip_embed.model={clip['model']}", f"clip_embed.pretrained={clip['pretrained']}"]
        if clip.get("fps"):
            base.append(f"frame_fps={clip['fps']}")
    if (data.get("latent") or {}).get("vae"):
        base.append(f"vae_latents.preset={data['latent']['vae']}")
    return load_config(None, base + list(user))


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from model.media import mux, read_conditions, token_frame_times, write_wav
    from model.text import encode_batch, load_tokenizer
    from model.vae import AudioVAE, resolve_files
    from pipeline.weights import WeightsMissing

    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".wav"):
        print(f"error: --out must end in .mp4 or .wav, got {out.name}", file=sys.stderr)
        return 2
    if out.suffix.lower() == ".mp4" and not args.video:
        print("error: an .mp4 output needs --video (give --out OUT.wav for music alone)", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.time()
    try:
        ckpt, cfg = read_checkpoint(args.ckpt)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stage = ckpt.get("stage") or ("v2m" if cfg.use_video else "t2m")
    if cfg.use_video and not args.video:
        print(f"error: {args.ckpt} is a {stage} checkpoint (video-conditioned): give --video", file=sys.stderr)
        return 2
    config = pipeline_config(ckpt, args.sets + args.overrides)

    # Weights first, so that a missing file ends the run before any work.
    try:
        vae_files = resolve_files(config.vae_latents)
        clip_stage = None
        if cfg.use_video:
            from stages.clip_embed import SETTING, ClipEmbed

            resolved = ClipEmbed.prepare(config)[SETTING]
            config = pipeline_config(ckpt, args.sets + args.overrides + [f"{SETTING}={resolved}"])
            clip_stage = ClipEmbed(config)
    except WeightsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3

    # Duration: the request, else the video's (capped at the trained length), else 10 s.
    trained = cfg.max_frames / cfg.latent_rate
    duration = None
    if args.video:
        from stages.probe import read_streams

        duration = read_streams(args.video).get("duration")
    seconds = args.seconds if args.seconds else (min(duration, trained) if duration else 10.0)
    if seconds <= 0:
        print(f"error: --seconds must be positive, got {seconds}", file=sys.stderr)
        return 2
    if seconds > trained + 1e-6:
        print(f"warning: {seconds:g} s is longer than the trained {trained:g} s", file=sys.stderr)
    frames = int(round(seconds * cfg.latent_rate))
    patches = math.ceil(frames / cfg.patch)

    video = rhythm = None
    if args.video and (cfg.use_video or cfg.use_rhythm):
        times = token_frame_times(cfg, patches * cfg.patch / cfg.latent_rate, config.frame_fps) if cfg.use_video else None
        cond = read_conditions(args.video, config, patches * cfg.patch / cfg.latent_rate, times, cfg.use_rhythm, cfg.latent_rate)
        if cfg.use_video:
            clip_stage.setup()
            emb = clip_stage.embed([cond["frames"]])[0]
            if emb.shape[1] != cfg.clip_dim:
                print(f"error: CLIP {config.clip_embed.model} gives {emb.shape[1]}-d embeddings; the checkpoint was "
                      f"trained on {cfg.clip_dim}-d", file=sys.stderr)
                return 2
            video = torch.from_numpy(np.asarray(emb, np.float32))[None].to(device)
        if cfg.use_rhythm:
            rhythm = torch.from_numpy(cond["rhythm"].astype(np.float32))[None].to(device)

    model, which = build_model(ckpt, cfg, not args.no_ema, device)
    tok = load_tokenizer(cfg)
    ids, mask = encode_batch(tok, [args.prompt], cfg.text_max_tokens)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    steps = args.steps or cfg.sample_steps
    scale = cfg.cfg_scale if args.cfg is None else args.cfg
    latent = model.generate(ids, mask, video=video, rhythm=rhythm, frames=frames, steps=steps, cfg_scale=scale, generator=gen)

    vae = AudioVAE.load(vae_files[0], vae_files[1], config.vae_latents.preset, device=device,
                        precision=config.vae_latents.precision)
    if latent.shape[1] != vae.spec.latent_dim:
        print(f"error: the model makes {latent.shape[1]} latent channels; the {config.vae_latents.preset} VAE "
              f"takes {vae.spec.latent_dim}", file=sys.stderr)
        return 2
    audio = vae.decode(latent.float().cpu())[0]
    audio = audio[:, : int(round(seconds * vae.sample_rate))]
    wav = out.with_suffix(".wav")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_wav(wav, audio, vae.sample_rate)
    print(f"generated {audio.shape[1] / vae.sample_rate:.2f} s ({frames} latent frames, {patches} patches) at "
          f"{vae.sample_rate} Hz, {steps} Euler steps/patch, cfg {scale:g}, seed {args.seed}, prompt {args.prompt!r}")
    print(f"weights: {args.ckpt} ({stage}, step {ckpt.get('step')}, {which}); VAE {config.vae_latents.preset} "
          f"{vae_files[1]}" + (f"; CLIP {config.clip_embed.model} {config.clip_embed.pretrained} at "
                                f"{config.frame_fps:g} fps" if cfg.use_video else ""))
    print(f"wrote {wav}")
    if out.suffix.lower() == ".mp4":
        written = mux(args.video, audio, vae.sample_rate, out)
        print(f"wrote {out} (video stream copied from {args.video}, {written:.2f} s AAC audio)")
    print(f"took {time.time() - t0:.1f} s on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
