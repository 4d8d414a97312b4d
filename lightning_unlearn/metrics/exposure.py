"""Exposure of inserted canaries (Carlini et al., 2019, "The Secret Sharer").

For a canary `prefix + secret` whose secret was drawn from a randomness space `R`, the log-perplexity of a
candidate `c` is `-log P(c | prefix)` (nats, summed over the candidate's tokens) and

    exposure = log2 |R| - log2 rank(secret),   rank = 1 + #{c in R, c != secret : logppl(c) <= logppl(secret)}

Ties rank the other candidate before the secret, as TF-Privacy's implementation does. Exposure is exact up to
`max_exact` candidates (prefix-tree enumeration, see `candidates.py`); beyond, the rank is estimated from a
uniform sample. Both modes also report the skew-normal extrapolation `-log2 CDF(logppl(secret))`, the CDF of a
skew-normal fitted to candidate log-perplexities. Canaries with `repetitions == 0` are never-inserted references:
their exposure is the level an unlearned model should reach. High exposure = memorised; lower is better after
unlearning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from tqdm.auto import tqdm

from lightning_unlearn.metrics.candidates import (
    RandomnessSpace,
    enumerate_scores,
    score_candidates,
    tokenize_space,
)


@dataclass(frozen=True)
class CanarySpec:
    """One canary: `prefix + secret`, the secret being `length` symbols of `alphabet` joined by `separator`.

    `id` is a stable integer (reports show ids, never texts); `repetitions` is how often it was inserted in
    training (0 for a reference canary). The texts are hidden from `repr`.
    """

    id: int
    prefix: str = field(repr=False)
    secret: str = field(repr=False)
    repetitions: int = 0
    alphabet: Sequence[str] = "0123456789"
    length: int | None = None
    separator: str = " "
    name: str | None = None

    @property
    def label(self) -> str:
        """What reports show: the name when given, else the id."""
        return self.name if self.name is not None else str(self.id)

    def space(self) -> RandomnessSpace:
        alphabet = tuple(self.alphabet)
        length = self.length
        if length is None:
            length = len(self.secret.split(self.separator)) if self.separator else len(self.secret)
        return RandomnessSpace(alphabet, length, self.separator)


def canary_specs(canaries) -> list[CanarySpec]:
    """CanarySpecs from a list of them or from a canary registry (duck-typed: `inserted`, `references`, `space`).

    Registry canaries get integer ids by position (inserted first, then references) and keep their own id as name.
    """
    if hasattr(canaries, "inserted") and hasattr(canaries, "space"):
        space = canaries.space
        every = list(canaries.inserted) + list(canaries.references)
        return [CanarySpec(i, c.prefix, c.secret, int(c.repetitions), tuple(space.alphabet), space.length,
                           space.separator, name=str(c.id)) for i, c in enumerate(every)]
    specs = list(canaries)
    if not all(isinstance(c, CanarySpec) for c in specs):
        raise TypeError("canaries must be CanarySpec objects or a canary registry (lightning_unlearn.data)")
    return specs


def rank_with_ties(candidates: np.ndarray | Tensor, secret: float) -> int:
    """1 + the number of candidates (the secret excluded) whose log-perplexity is <= the secret's (TF-Privacy)."""
    values = torch.as_tensor(candidates, dtype=torch.float64)
    return 1 + int((values <= secret).sum())


def exposure_from_rank(rank: float, space_size: float) -> float:
    """`log2 |R| - log2 rank`: 0 for the least likely candidate, log2 |R| for the most likely one."""
    return math.log2(space_size) - math.log2(rank)


def skewnorm_exposure(candidates: np.ndarray | Tensor, secret: float) -> float:
    """Extrapolated exposure `-log2 CDF(secret)` of a skew-normal fitted (MLE) to candidate log-perplexities."""
    values = np.asarray(torch.as_tensor(candidates, dtype=torch.float64))
    values = values[np.isfinite(values)]
    if values.size < 3 or np.ptp(values) == 0:  # nothing to fit: degenerate (e.g. uniform) model
        return float("nan")
    try:
        a, loc, scale = stats.skewnorm.fit(values)
    except stats.FitError:
        return float("nan")
    return float(-stats.skewnorm.logcdf(secret, a, loc, scale) / math.log(2.0))


class Exposure(Metric):
    """Per-canary exposure (exact or sampled) and its skew-normal extrapolation; means by repetition count.

    `update(model, canaries)` scores each canary's randomness space under `model`; `compute()` returns a dict:
    per canary (`canary_id`, `repetitions`, `exposure`, `exposure_extrapolated`, `log_perplexity`, `rank`,
    `exact`), and `mean` (inserted canaries), `reference_mean` (never inserted), `extrapolated_mean`,
    `by_repetitions` ({count: mean exposure}).
    """

    full_state_update = False
    higher_is_better = False
    _STATES = ("canary_id", "repetitions", "exposure", "exposure_extrapolated", "log_perplexity", "rank", "exact")

    def __init__(
        self,
        tokenizer,
        *,
        max_exact: int = 10**6,
        num_samples: int = 10_000,
        fit_samples: int = 5_000,
        batch_size: int = 1024,
        use_cache: bool | None = None,
        add_special_tokens: bool = True,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.max_exact, self.num_samples, self.fit_samples = max_exact, num_samples, fit_samples
        self.batch_size, self.use_cache, self.seed = batch_size, use_cache, seed
        self.add_special_tokens = add_special_tokens
        for name in self._STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _generator(self, canary_id: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(canary_id))

    def score(self, model: nn.Module, canary: CanarySpec, scores_cache: dict | None = None) -> dict[str, float]:
        """Exposure of one canary (no state change).

        `scores_cache` (a dict owned by the caller, valid for one model state) keeps the enumerated scores of a
        prefix and space: canaries sharing a template are ranked against one enumeration instead of one each.
        """
        space = canary.space()
        secret = space.parse(canary.secret)
        tokens = tokenize_space(self.tokenizer, canary.prefix, space, secret,
                                add_special_tokens=self.add_special_tokens)
        gen = self._generator(canary.id)
        kw = dict(batch_size=self.batch_size, use_cache=self.use_cache)
        if space.size <= self.max_exact:
            key = (tuple(tokens.prefix_ids), tuple(tuple(p) for p in tokens.pieces))
            if scores_cache is not None and key in scores_cache:
                nll = scores_cache[key]
            else:
                nll = -enumerate_scores(model, tokens, **kw)
                if scores_cache is not None:
                    scores_cache[key] = nll
            at = space.index(secret)
            secret_nll = float(nll[at])
            others = torch.cat([nll[:at], nll[at + 1:]])
            rank = float(rank_with_ties(others, secret_nll))
            fit = others[torch.randperm(others.numel(), generator=gen)[: self.fit_samples]]
            exact = True
        else:
            sample = torch.randint(0, len(space.alphabet), (self.num_samples, space.length), generator=gen)
            sample = sample[(sample != torch.tensor(secret)).any(dim=1)]
            nll = -score_candidates(model, tokens, torch.cat([torch.tensor([secret]), sample]), **kw)
            secret_nll, others = float(nll[0]), nll[1:]
            count = rank_with_ties(others, secret_nll) - 1
            rank = 1.0 + count * (space.size - 1) / max(1, others.numel())
            fit = others[: self.fit_samples]
            exact = False
        return {
            "exposure": exposure_from_rank(rank, space.size),
            "exposure_extrapolated": skewnorm_exposure(fit, secret_nll),
            "log_perplexity": secret_nll,
            "rank": rank,
            "exact": float(exact),
        }

    def update(self, model: nn.Module, canaries: Sequence[CanarySpec], *, progress: bool = False) -> None:
        """Score `canaries` under `model`; canaries sharing a prefix and space share one enumeration."""
        was_training = model.training
        model.eval()
        scores_cache: dict = {}
        try:
            for canary in tqdm(canaries, desc="exposure", disable=not progress, leave=False):
                result = self.score(model, canary, scores_cache)
                self.canary_id.append(torch.tensor([int(canary.id)], device=self.device))
                self.repetitions.append(torch.tensor([int(canary.repetitions)], device=self.device))
                for name, value in result.items():
                    getattr(self, name).append(torch.tensor([value], dtype=torch.float64, device=self.device))
        finally:
            model.train(was_training)

    def compute(self) -> dict:
        if not self.canary_id:
            raise ValueError("Exposure.compute() called before update(); give at least one canary")
        out = {name: dim_zero_cat(getattr(self, name)) for name in self._STATES}
        out["exact"] = out["exact"].bool()
        order = torch.argsort(out["canary_id"], stable=True)  # the same result whatever the update order
        out = {k: v[order] for k, v in out.items()}
        reps, exposure = out["repetitions"], out["exposure"]
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=exposure.device)
        inserted = reps > 0
        out["mean"] = exposure[inserted].mean() if inserted.any() else nan
        out["reference_mean"] = exposure[~inserted].mean() if (~inserted).any() else nan
        out["extrapolated_mean"] = out["exposure_extrapolated"][inserted].mean() if inserted.any() else nan
        out["by_repetitions"] = {int(r): exposure[reps == r].mean() for r in torch.unique(reps).tolist()}
        return out
