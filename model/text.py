"""Text prompts -> token ids. The default is a UTF-8 byte tokenizer, which needs no files (and so
works offline and in CI); with `lm_init` or `tokenizer` set to a path or hub id, the pretrained
LM's own tokenizer is used, so that its embeddings stay meaningful."""
from __future__ import annotations

from typing import Any

import torch


class ByteTokenizer:
    """Ids 0..255 are bytes; 256 = pad, 257 = end of text."""

    pad_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str, max_tokens: int) -> list[int]:
        return list(text.encode("utf-8")[: max_tokens - 1]) + [self.eos_id]


class HFTokenizer:
    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(name)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.pad_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str, max_tokens: int) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        return ids + [self.eos_id]


def load_tokenizer(cfg: Any) -> ByteTokenizer | HFTokenizer:
    name = cfg.lm_init if cfg.tokenizer == "bytes" and cfg.lm_init else cfg.tokenizer
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


def encode_batch(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] and mask [B, L] (True = a real token); L = the longest in the batch.
    An empty prompt (the dropped text condition) is the lone end-of-text token."""
    rows = [tokenizer.encode(t, max_tokens) for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask
