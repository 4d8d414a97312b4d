"""A tiny corpus where a small causal LM memorises digit canaries: shared by the Newton and default-recipe tests.

Retain text is a Markov chain over every token (digits included); a canary is chain text with six random digits at
positions 8..13, labelled only on that span (span-level forgetting). Holdout canaries are drawn the same way and never
trained on: the level "never seen" that the unlearning target is calibrated on.
"""

from __future__ import annotations

import torch

from lightning_unlearn.models import small_causal_lm

V, T = 48, 16


def batch(x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone() if labels is None else labels}


def corpus(seed: int = 0, n_holdout: int = 0):
    """A Markov chain over every token (digits included) as retain text; canaries = chain text with six random
    digits at positions 8..13, labelled only on that span (span-level forgetting)."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(V, V, generator=g) * 2, -1)
    trans[:, V - 1] = 0
    trans = trans / trans.sum(-1, keepdim=True)

    def chain(n: int) -> torch.Tensor:
        x = torch.zeros(n, T, dtype=torch.long)
        x[:, 0] = torch.randint(0, V - 1, (n,), generator=g)
        for t in range(1, T):
            x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g).squeeze(-1)
        return x

    retain, held = chain(256), chain(64)
    canaries = chain(4 + n_holdout)
    canaries[:, 8:14] = torch.randint(0, 10, (4 + n_holdout, 6), generator=g)
    labels = torch.full_like(canaries, -100)
    labels[:, 8:14] = canaries[:, 8:14]
    if n_holdout:
        return retain, held, canaries[:4], labels[:4], canaries[4:], labels[4:]
    return retain, held, canaries, labels


def memorise(arch: str = "gpt2", steps: int = 300, seed: int = 0, n_holdout: int = 8, **sizes):
    """A tiny `arch` model trained with Adam on the retain text plus 4 canaries repeated 8 times.

    Returns (model, forget batch, retain batches, held retain batch, holdout batch)."""
    retain, held, canaries, labels, hold, hold_labels = corpus(seed, n_holdout)
    model = small_causal_lm(arch, vocab_size=V, hidden=sizes.pop("hidden", 32), seed=seed, **sizes).train()
    data = torch.cat([retain, canaries.repeat(8, 1)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(**batch(data[torch.randint(0, len(data), (32,), generator=g)])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    retain_batches = [batch(retain[i:i + 64]) for i in range(0, 256, 64)]
    return model, batch(canaries, labels), retain_batches, batch(held), batch(hold, hold_labels)


