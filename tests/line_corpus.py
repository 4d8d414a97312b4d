"""Whole lines about people (a name and a phone number) that a tiny causal LM memorises: knowledge, not a secret.

Every line is `<first> <last> 's phone is d d d d d d .`, labelled on every token (whole-line forgetting): the
template is shared by every line, first and last names recur across people, so forgetting a line without moving
the lines of the same kind is the hard case (TOFU's, in miniature). The model is trained on the retain and forget
lines equally often until it has memorised them all; holdout lines are drawn the same way and never trained on (the
level "never seen"); `held` is a sample of retain lines that is neither curvature nor step data (the budget), and
`check` another one, never shown to the unlearner, to verify the damage.
"""

from __future__ import annotations

import torch

from lightning_unlearn.models import small_causal_lm

FIRST, LAST, DIGITS = 24, 192, 10
TEMPLATE = 4  # 's  phone  is  .
WORDS = 32  # the prose's own words
V = FIRST + LAST + DIGITS + TEMPLATE + WORDS + 1  # + eos
_F0, _L0, _D0, _T0, _W0 = 0, FIRST, FIRST + LAST, FIRST + LAST + DIGITS, FIRST + LAST + DIGITS + TEMPLATE


def lines(n: int, g: torch.Generator) -> torch.Tensor:
    """`n` lines [n, 12] of `n` people: a first name (shared by several people), a last name of their own, 's, phone,
    is, six digits, '.'."""
    if n > LAST:
        raise ValueError(f"at most {LAST} people (one last name each), got {n}")
    x = torch.empty(n, 12, dtype=torch.long)
    x[:, 0] = _F0 + torch.randint(0, FIRST, (n,), generator=g)
    x[:, 1] = _L0 + torch.randperm(LAST, generator=g)[:n]
    x[:, 2], x[:, 3], x[:, 4] = _T0, _T0 + 1, _T0 + 2
    x[:, 5:11] = _D0 + torch.randint(0, DIGITS, (n, 6), generator=g)
    x[:, 11] = _T0 + 3
    return x


def prose(n: int, g: torch.Generator, trans: torch.Tensor) -> torch.Tensor:
    """`n` sequences [n, 12] of a Markov chain over the prose words (what the model generalises on)."""
    x = torch.empty(n, 12, dtype=torch.long)
    x[:, 0] = torch.randint(0, WORDS, (n,), generator=g)
    for t in range(1, 12):
        x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g).squeeze(-1)
    return x + _W0


def batch(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def memorise_lines(arch: str, *, seed: int = 0, n_lines: int = 128, n_forget: int = 8, n_holdout: int = 32,
                   n_prose: int = 512, steps: int = 800, hidden: int = 64):
    """A tiny untied `arch` model trained with Adam on prose, retain lines and forget lines until it has memorised
    the lines (each line as often as each prose sequence).

    Returns (model, forget batch, retain batches (prose and retain lines: curvature and step data), held batch (prose
    never trained on: the held-out retain loss, the budget), check batches (other never-trained prose, retain lines:
    never shown to the unlearner), holdout batch (never-trained lines)).
    """
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(WORDS, WORDS, generator=g) * 2, -1)
    people = lines(n_lines + n_forget + n_holdout, g)
    forget, holdout = people[:n_forget], people[n_forget:n_forget + n_holdout]
    retain_lines = people[n_forget + n_holdout:]
    text, held, check = prose(n_prose, g, trans), prose(64, g, trans), prose(64, g, trans)
    model = small_causal_lm(arch, vocab_size=V, hidden=hidden, heads=4, seed=seed, tie_embeddings=False).train()
    data = torch.cat([text, retain_lines, forget])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(**batch(data[torch.randint(0, len(data), (32,), generator=g)])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    mixed = torch.cat([text[:128], retain_lines[:64]])[torch.randperm(192, generator=g)]
    retain_batches = [batch(mixed[i:i + 48]) for i in range(0, 192, 48)]
    return model, batch(forget), retain_batches, batch(held), [batch(check), batch(retain_lines)], batch(holdout)
