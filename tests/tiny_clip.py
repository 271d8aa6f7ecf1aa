"""A tiny random-weight open_clip model for tests (import as `from tiny_clip import make_tiny_clip`):
a JSON model config open_clip does not ship plus a checkpoint file, so tests take the same
`config_file` + local `pretrained` path as a real custom model. Builds in well under a second."""
from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP_NAME = "tiny-clip-test"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    # 64 px input: the pipeline's 224 px frames go through the resize path of the preprocessing.
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "head_width": 16, "layers": 2},
    # The standard BPE tokenizer (vocab 49408, 77 tokens) so the real tokenizer path is exercised.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def make_tiny_clip(folder: str | Path, seed: int = 0) -> tuple[str, str, str]:
    """Write `<folder>/tiny-clip-test.json` and a random-weight state_dict; returns
    (model_name, config_path, checkpoint_path)."""
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{TINY_CLIP_NAME}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    ckpt_path = folder / f"{TINY_CLIP_NAME}-seed{seed}.pt"
    if not ckpt_path.exists():
        open_clip.add_model_config(config_path)
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None, device="cpu")
        with torch.no_grad():  # spread the random weights so different images get different embeddings
            model.visual.proj.mul_(4.0)
        torch.save(model.state_dict(), ckpt_path)
    return TINY_CLIP_NAME, str(config_path), str(ckpt_path)
