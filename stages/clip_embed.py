"""clip_embed: CLIP embeddings of every kept frame (float16, L2-normalised) and zero-shot visual tags
(setting, subject, mood, motion, time of day, lighting...) scored against prompts/<tags>.yaml.

Weights come from `clip_embed.pretrained`: a local file, or an open_clip pretrained tag resolved on
the driver (`prepare`) to the Hugging Face cache file open_clip would download. Workers only open
local files."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline.stage import Reject, Resources, Row, Stage
from pipeline.weights import WeightsMissing, resolve_hub_file, resolve_local

SETTING = "clip_embed.pretrained"
WHAT = "clip_embed weights"
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt", ".npz")
HF_WEIGHTS_NAME, HF_SAFE_WEIGHTS_NAME = "open_clip_pytorch_model.bin", "open_clip_model.safetensors"


def hub_candidates(filename: str) -> list[str]:
    """The files open_clip's download_pretrained_from_hf tries, in its order (safetensors first)."""
    if not filename or filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:
        return None


class ClipEmbed(Stage):
    name = "clip_embed"
    consumes = ("frames",)

    def __init__(self, config: Any, context=None):
        super().__init__(config, context)
        cfg = config.clip_embed
        self.resources = Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, pool_size=cfg.pool_size,
                                   batch_size=cfg.batch_size)

    @classmethod
    def prepare(cls, config: Any) -> dict[str, Any]:
        import open_clip

        from stages.clip_model import hub_file, register_config

        cfg = config.clip_embed
        pretrained = cfg.pretrained
        if Path(pretrained).expanduser().is_file() or "/" in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
            return {SETTING: resolve_local(pretrained, WHAT)}  # a path: a typo fails, never downloads
        register_config(cfg.model, cfg.config_file)  # ValueError for an unknown model
        tag_cfg = open_clip.get_pretrained_cfg(cfg.model, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(cfg.model)
            raise ValueError(f"{pretrained!r} is neither a file nor an open_clip pretrained tag of {cfg.model}; "
                             f"valid tags: {', '.join(tags) or 'none (give a local weights file)'}")
        repo, filename = hub_file(tag_cfg)
        if not repo:
            raise WeightsMissing(f"{WHAT}: {cfg.model}/{pretrained} has no Hugging Face repo; download "
                                 f"{tag_cfg.get('url') or 'its weights'} and set {SETTING}=/path/to/the/file")
        names = hub_candidates(filename)
        for name in names:  # any cached copy first, whichever name
            if path := _cached(repo, name):
                return {SETTING: path}
        first: WeightsMissing | None = None
        for name in names:
            try:
                return {SETTING: resolve_hub_file(repo, name, WHAT, SETTING)}
            except WeightsMissing as exc:
                first = first or exc
                if "download failed" not in str(exc):
                    break  # offline or unreachable: no other name can come either
        alternatives = f" (open_clip also accepts {', '.join(f'{repo}/{n}' for n in names[1:])})" if len(names) > 1 else ""
        raise WeightsMissing(f"{first}{alternatives}") from first

    def setup(self) -> None:
        from pipeline.devices import DTYPES, torch_device, torch_dtype
        from stages import clip_model

        cfg = self.config.clip_embed
        path = cfg.pretrained
        if not Path(path).is_file():  # run without the driver's preflight (a direct caller)
            path = self.prepare(self.config)[SETTING]
        self.device = torch_device()
        self.dtype = torch_dtype(cfg.precision, self.device)
        self.precision = next(k for k, v in DTYPES.items() if v == str(self.dtype).removeprefix("torch."))
        self.model = clip_model.load(cfg.model, path, cfg.config_file, self.device, self.dtype)
        tag, _ = clip_model.tag_cfg_for(cfg.model, path)
        self.pretrained_name = tag or Path(path).name
        self.dim = clip_model.embed_dim(self.model)
        self.vocabulary = clip_model.load_vocabulary(cfg.tags)
        self.tag_emb = clip_model.cached_tag_embeddings(self.model, cfg.model, path, cfg.tags, self.device, self.dtype)
        self.scale = clip_model.logit_scale(self.model)

    def embed(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """float32 [frames, dim] per clip; clips of one frame size share forward passes."""
        from stages.clip_model import encode_frames

        out: list[np.ndarray | None] = [None] * len(clips)
        shapes = sorted({c.shape[1:] for c in clips})
        for shape in shapes:
            idx = [i for i, c in enumerate(clips) if c.shape[1:] == shape]
            emb = encode_frames(self.model, np.concatenate([clips[i] for i in idx]), self.device, self.dtype)
            for i, part in zip(idx, np.split(emb, np.cumsum([len(clips[i]) for i in idx])[:-1])):
                out[i] = part
        return out  # type: ignore[return-value]

    def process(self, rows: list[Row]) -> Iterable[Row | Reject]:
        from stages.clip_model import score_tags

        cfg = self.config.clip_embed
        problems = {id(r): _frames_problem(r.get("frames")) for r in rows}
        good = [r for r in rows if problems[id(r)] is None]
        try:
            embeddings = dict(zip(map(id, good), self.embed([r["frames"] for r in good])))
        except Exception:  # one clip broke the batch: embed one by one so only it is rejected
            embeddings = {}
            for r in good:
                try:
                    embeddings[id(r)] = self.embed([r["frames"]])[0]
                except Exception as exc:
                    problems[id(r)] = f"embedding failed: {type(exc).__name__}: {exc}"
        for row in rows:
            if problems[id(row)] is not None:
                yield Reject.for_row(self.name, row, "clip_failed", problems[id(row)])
                continue
            emb = embeddings[id(row)]
            row["clip_embeddings"] = emb.astype(np.float16)
            row["meta"]["clip_embed"] = {
                "model": cfg.model, "pretrained": self.pretrained_name, "dim": self.dim,
                "fps": self.config.frame_fps, "frames": int(len(emb)),
                "precision": self.precision, "device": self.device.type,
            }
            row["meta"]["visual_tags"] = score_tags(emb, self.tag_emb, self.vocabulary["categories"], self.scale, cfg.top_k)
            yield row


def _frames_problem(frames: Any) -> str | None:
    """Why these frames cannot be embedded, or None."""
    if not isinstance(frames, np.ndarray):
        return f"no frames (got {type(frames).__name__})"
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[1:3], default=0) < 1:
        return f"frames must be [N, H, W, 3]; got shape {list(frames.shape)}"
    if len(frames) == 0:
        return "no frames in the clip"
    if frames.dtype != np.uint8:
        return f"frames must be uint8 RGB; got {frames.dtype}"
    return None
