"""Models and batches small enough for dense (brute-force) curvature matrices in float64, shared by the
matrix-free backends' tests."""

import torch
from torch import nn

from lightning_unlearn.models import small_causal_lm

DT = torch.float64


def mlp(seed: int = 0, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(DT)


def mlp_batch(kind: str, b: int = 6, seed: int = 1, out: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, generator=g, dtype=DT)
    y = torch.randn(b, out, generator=g, dtype=DT) if kind == "mse" else torch.randint(0, out, (b,), generator=g)
    return {"inputs": x, "labels": y}


def tiny_gpt2() -> nn.Module:
    return small_causal_lm("gpt2", vocab_size=16, hidden=4, layers=1, heads=2, max_positions=8, dtype=DT)


def lm_batch(b: int = 2, t: int = 5, seed: int = 2, vocab: int = 16, pad: int = 0) -> dict:
    """Token batch with a position without loss inside a row and, with `pad`, padded tails (label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        ids = torch.cat([ids, torch.full((b, pad), vocab - 1)], 1)
        labels = torch.cat([labels, torch.full((b, pad), -100)], 1)
        mask = torch.cat([mask, torch.zeros(b, pad, dtype=torch.long)], 1)
    labels[-1, 2] = -100  # a position without loss inside a row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
