"""Which device and dtype a model stage runs in. No device literals elsewhere: under Ray a stage
with `num_gpus > 0` sees its GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES); with 0 it sees none."""
from __future__ import annotations

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def torch_dtype(precision: str, device):
    """`auto` is bf16 on a GPU and fp32 on CPU (half precision on CPU is slow and lossy)."""
    import torch

    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16; got {precision!r}")
    return getattr(torch, DTYPES[precision])
