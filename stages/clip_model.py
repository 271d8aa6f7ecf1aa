"""The open_clip wrapper behind `clip_embed`: load a model from a local weights file (never a
download), preprocess uint8 frames as tensors (no PIL), embed them, and score a zero-shot tag
vocabulary against them."""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from pipeline.worker_env import cache_root

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
MAX_FRAMES_PER_FORWARD = 256
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
_HF_CACHE_REPO = re.compile(r"models--([^/\\]+?)--([^/\\]+)")


@lru_cache(maxsize=8)
def load_vocabulary(name: str) -> dict:
    """{"templates": [...], "categories": {category: [tag, ...]}} from prompts/<name>.yaml."""
    path = PROMPTS_DIR / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"tag vocabulary {name!r} not found at {path}")
    data = yaml.safe_load(path.read_text())
    templates, categories = data.get("templates") or [], data.get("categories") or {}
    if not templates or not all("{}" in t for t in templates):
        raise ValueError(f"{path}: templates must be a non-empty list of strings with a {{}}")
    if not categories or not all(isinstance(v, list) and v for v in categories.values()):
        raise ValueError(f"{path}: categories must map names to non-empty lists of tags")
    return {"templates": list(templates), "categories": {k: [str(t) for t in v] for k, v in categories.items()}}


def register_config(model_name: str, config_file: str | None) -> None:
    """Make a model open_clip does not ship known to it (the JSON file's stem is the model name)."""
    import open_clip

    if config_file:
        path = Path(config_file)
        if path.stem != model_name:
            raise ValueError(f"open_clip names a config file's model by its stem: {path.name} is {path.stem!r}, not {model_name!r}")
        open_clip.add_model_config(path)
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r} (give clip_embed.config_file for a custom one)")


def hub_file(tag_cfg: dict) -> tuple[str, str]:
    """(repo, filename) of a tag's Hugging Face weights, split as open_clip's download_pretrained
    does; "" for the filename means open_clip's default (open_clip_model.safetensors, else .bin)."""
    repo, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    return repo, filename


def tag_cfg_for(model_name: str, pretrained: str) -> tuple[str | None, dict]:
    """(tag, open_clip pretrained cfg) for a tag, or for a Hugging Face cache file of a tag's repo
    (so a resolved file still gets its tag's QuickGELU and mean/std)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if cfg:
        return pretrained, cfg
    found = _HF_CACHE_REPO.search(str(pretrained))
    if found:
        repo = f"{found.group(1)}/{found.group(2)}"
        for tag in open_clip.list_pretrained_tags_by_model(model_name):
            cfg = open_clip.get_pretrained_cfg(model_name, tag)
            if hub_file(cfg)[0] == repo:
                return tag, cfg
    return None, {}


def load(model_name: str, pretrained_path: str, config_file: str | None, device, dtype):
    """An eval-mode open_clip model with weights from a local file, on `device` in `dtype`."""
    import open_clip

    register_config(model_name, config_file)
    if not Path(pretrained_path).is_file():
        raise FileNotFoundError(f"CLIP weights {pretrained_path} are not a file (resolve them in prepare first)")
    _, tag_cfg = tag_cfg_for(model_name, pretrained_path)
    model = open_clip.create_model(
        model_name, pretrained=pretrained_path, device="cpu", precision="fp32",
        force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
        force_preprocess_cfg={k: tag_cfg[k] for k in PREPROCESS_KEYS if k in tag_cfg},
        pretrained_image=False, pretrained_text=False,  # towers' own base weights would download
    )
    return model.to(device=device, dtype=dtype).eval()


def preprocess(frames: torch.Tensor, model) -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> normalised float [N, 3, S, S] as open_clip's eval transform:
    shortest side resized to S (antialiased, the PIL-like path), centre crop, mean/std."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        mode = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        if cfg.get("resize_mode") == "squash":
            new = (size, size)
        else:  # shortest (and longest, which matches it on square frames): keep aspect, then crop
            scale = size / min(h, w)
            new = (max(size, round(h * scale)), max(size, round(w * scale)))
        x = F.interpolate(x, size=new, mode=mode, antialias=True, align_corners=False).clamp_(0, 255)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(cfg["mean"], device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg["std"], device=x.device).view(1, 3, 1, 1) * 255.0
    return (x - mean) / std


@torch.inference_mode()
def encode_frames(model, frames: np.ndarray, device, dtype, chunk: int = MAX_FRAMES_PER_FORWARD) -> np.ndarray:
    """uint8 [N, H, W, 3] -> L2-normalised float32 [N, dim], `chunk` frames per forward pass."""
    out = []
    for i in range(0, len(frames), chunk):
        x = torch.from_numpy(np.ascontiguousarray(frames[i : i + chunk])).to(device, non_blocking=True)
        emb = model.encode_image(preprocess(x, model).to(dtype))
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, embed_dim(model)), np.float32)


def embed_dim(model) -> int:
    return int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
        else int(model.visual.output_dim)


@torch.inference_mode()
def tag_embeddings(model, tokenizer, vocabulary: dict, device, dtype) -> dict[str, np.ndarray]:
    """{category: float32 [tags, dim]}: each tag's prompt-ensembled, normalised text embedding."""
    templates = vocabulary["templates"]
    out = {}
    for category, tags in vocabulary["categories"].items():
        texts = [t.format(tag) for tag in tags for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device)).float()
        emb = F.normalize(emb, dim=-1).view(len(tags), len(templates), -1).mean(1)
        out[category] = F.normalize(emb, dim=-1).cpu().numpy()
    return out


def cached_tag_embeddings(model, model_name: str, weights: str, vocabulary_name: str, device, dtype) -> dict[str, np.ndarray]:
    """`tag_embeddings`, kept on disk per (model, weights file, vocabulary, dtype): on CPU the text
    tower takes ~30 s over a vocabulary, and every worker of every run would pay it again."""
    import hashlib

    import open_clip

    vocabulary = load_vocabulary(vocabulary_name)
    stat = Path(weights).stat()
    ident = json.dumps([model_name, str(Path(weights).resolve()), stat.st_size, stat.st_mtime_ns, vocabulary, str(dtype)])
    root = cache_root() / "clip_tags"
    path = root / f"{hashlib.blake2b(ident.encode(), digest_size=16).hexdigest()}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            if set(data.files) == set(vocabulary["categories"]):
                return {k: data[k] for k in vocabulary["categories"]}
    emb = tag_embeddings(model, open_clip.get_tokenizer(model_name), vocabulary, device, dtype)
    try:  # a cache that cannot be written (read-only home) costs time, not the run
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **emb)
        os.replace(tmp, path)
    except OSError:
        pass
    return emb


def logit_scale(model) -> float:
    return float(model.logit_scale.detach().float().exp().item())


def score_tags(frame_emb: np.ndarray, tag_emb: dict[str, np.ndarray], tags: dict[str, list[str]],
               scale: float, top_k: int) -> dict[str, list[dict]]:
    """Per category: softmax over its tags of scale x cosine, averaged over frames; the top_k."""
    out = {}
    for category, emb in tag_emb.items():
        logits = scale * (frame_emb.astype(np.float32) @ emb.T)
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob = (prob / prob.sum(axis=1, keepdims=True)).mean(axis=0)
        order = np.argsort(-prob, kind="stable")[:top_k]
        out[category] = [{"tag": tags[category][i], "score": round(float(prob[i]), 4)} for i in order]
    return out
