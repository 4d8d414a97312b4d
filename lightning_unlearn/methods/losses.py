"""Forget objectives: the scalar each method *minimises* to forget a batch, and the measured forget loss.

Every objective only counts positions whose (shifted) label is not -100, so span-level forgetting is encoded by
the data (labels -100 outside the sensitive span). Each function returns `(loss, weight)`: the batch's mean
objective and the weight (number of positions or examples) that averages batches correctly.

- `nll`: `-mean NLL` (gradient ascent on the NLL). Its gradient on a target logit is `-(1 - p)`: it vanishes on
  the most memorised tokens (p ≈ 1), which are the ones that matter.
- `unlikelihood`: `mean -log(1 - p)` over target tokens (Welleck et al., 2020). Its gradient on the target logit
  is `p`: largest exactly where the model is most confident. Computed in log space, stable at p -> 1.
- `nll_normalized` / `unlikelihood_normalized`: per-example normalised: every example's mean token objective
  is divided by the (detached) norm of its own gradient before averaging, so each example pulls with unit
  strength however saturated it is (one backward pass per example: meant for small forget sets).

`DEFAULT_FORGET_LOSS` is `unlikelihood`: on memorised canaries it keeps a gradient where NLL ascent starves, and
in the tests it removes more likelihood per unit of retain damage than NLL ascent (see tests/test_methods_newton.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature.base import checked_grad, eval_mode, identity
from ..curvature.objective import IGNORE_INDEX, CrossEntropyObjective, model_logits

FORGET_LOSSES = ("unlikelihood", "nll", "unlikelihood_normalized", "nll_normalized")
DEFAULT_FORGET_LOSS = "unlikelihood"

_CE = CrossEntropyObjective()


def check_forget_loss(name: str) -> str:
    if name not in FORGET_LOSSES:
        raise ValueError(f"unknown forget_loss {name!r}; choose one of {', '.join(FORGET_LOSSES)}")
    return name


def shifted_targets(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(mask [B, T], targets [B, T]) with the Hugging Face shift (logits at t predict labels[t + 1])."""
    if "labels" not in batch:
        raise KeyError("batch has no 'labels'; forget/retain batches need labels (-100 where no loss is wanted)")
    return _CE.valid_mask(logits, batch["labels"].to(logits.device))


def token_nll(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token NLL [N] at the valid positions and the example index [N] of each."""
    mask, targets = shifted_targets(logits, batch)
    out = logits[mask].float()
    return F.cross_entropy(out, targets[mask], reduction="none"), mask.nonzero()[:, 0]


def mean_nll(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """(sum of token NLL, number of valid positions) of a batch: the measured forget/retain loss."""
    nll, _ = token_nll(model_logits(model, batch), batch)
    return nll.sum(), int(nll.numel())


def _token_unlikelihood(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """-log(1 - p_y) per valid token, stable: log(1 - p_y) = logsumexp_{j != y} z_j - logsumexp_j z_j."""
    mask, targets = shifted_targets(logits, batch)
    out = logits[mask].float()
    y = targets[mask]
    others = out.scatter(1, y[:, None], float("-inf"))
    log_one_minus_p = torch.logsumexp(others, dim=-1) - torch.logsumexp(out, dim=-1)
    return -log_one_minus_p, mask.nonzero()[:, 0]



#: batches of one shape run in one forward (`example_losses_joined`) while together they hold at most this many
#: positions: small batches, where a forward's fixed cost is much of its time, join; long ones (TOFU's answer
#: batches) stay apart, where one larger forward was measured slower than two (`docs/recipe.md` §3)
JOINT_POSITIONS = 1024


def _batch_losses(nll: Tensor, example: Tensor) -> tuple[Tensor, Tensor]:
    """(per-example mean token NLL of the examples with a valid position, [token NLL sum, token count]) of one
    batch's per-token NLL and example index (`token_nll`), in float64 on the CPU."""
    nll, example = nll.double().cpu(), example.cpu()
    rows = example.unique()
    sums = torch.zeros(int(example.max()) + 1 if len(example) else 0, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, example, nll)
    counts.index_add_(0, example, torch.ones_like(nll))
    return sums[rows] / counts[rows], torch.tensor([float(nll.sum()), float(nll.numel())], dtype=torch.float64)


def _group_losses(parts: Sequence[tuple[Tensor, Tensor]], reduce: Callable[[Tensor], Tensor]
                  ) -> tuple[Tensor, float, float]:
    total = reduce(sum((t for _, t in parts), torch.zeros(2, dtype=torch.float64)))
    if float(total[1]) <= 0:
        raise ValueError("no position with labels != -100 in the batches; nothing to measure the loss on")
    losses = torch.cat([x for x, _ in parts]) if parts else torch.zeros(0, dtype=torch.float64)
    return losses, float(total[0]), float(total[1])


def example_losses(model: nn.Module, batches: Sequence[Mapping[str, Tensor]],
                   reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, float, float]:
    """(this process's per-example mean token NLL [n], token NLL sum, token count) of `batches`, the sums reduced
    across processes by `reduce`."""
    with torch.no_grad(), eval_mode(model):
        parts = [_batch_losses(*token_nll(model_logits(model, b), b)) for b in batches]
    return _group_losses(parts, reduce)


def _joinable(run: list[Mapping[str, Tensor]], batch: Mapping[str, Tensor]) -> bool:
    """Whether `batch` can join the batches of `run` in one forward: the same tensors but for their number of
    rows, and at most `JOINT_POSITIONS` positions together."""
    first = run[0]
    if set(first) != set(batch) or not all(isinstance(v, Tensor) and v.dim() >= 1 for v in batch.values()):
        return False
    if any(first[k].shape[1:] != v.shape[1:] or first[k].dtype != v.dtype or first[k].device != v.device
           for k, v in batch.items()):
        return False
    rows = sum(b["labels"].shape[0] for b in run) + batch["labels"].shape[0]
    return rows * max(1, batch["labels"][0].numel()) <= JOINT_POSITIONS


def example_losses_joined(model: nn.Module, groups: Sequence[Sequence[Mapping[str, Tensor]]]
                          ) -> list[tuple[Tensor, float, float]]:
    """`example_losses` of each group of batches in one process, with consecutive batches of one shape (across the
    groups too) run in one forward up to `JOINT_POSITIONS` positions. One process only: which batches join depends
    on their shapes, which may differ between processes, and a sharded model needs every process to run the same
    forwards."""
    flat = [(g, b) for g, batches in enumerate(groups) for b in batches]
    runs: list[list[tuple[int, Mapping[str, Tensor]]]] = []
    for g, b in flat:
        if runs and "labels" in b and _joinable([x for _, x in runs[-1]], b):
            runs[-1].append((g, b))
        else:
            runs.append([(g, b)])
    parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in groups]
    with torch.no_grad(), eval_mode(model):
        for run in runs:
            joint = run[0][1] if len(run) == 1 else {k: torch.cat([b[k] for _, b in run]) for k in run[0][1]}
            nll, example = token_nll(model_logits(model, joint), joint)
            start = 0
            for g, b in run:
                n = b["labels"].shape[0]
                mine = (example >= start) & (example < start + n)
                parts[g].append(_batch_losses(nll[mine], example[mine] - start))
                start += n
    return [_group_losses(p, identity) for p in parts]


def gradient_sum(batches: Sequence[Mapping[str, Tensor]],
                 objective: Callable[[Mapping[str, Tensor]], tuple[Tensor, float]],
                 params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], float]:
    """(Σ w·∇loss over `params` in float32, Σ w) of `objective(batch) -> (loss, w)` over this process's batches
    (a batch of weight 0 is skipped); the caller reduces the sums and divides. Gradients need `torch.enable_grad`."""
    names, plist = list(params), list(params.values())
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    weight = 0.0
    for b in batches:
        loss, w = objective(b)
        if w == 0:
            continue
        for n, g in zip(names, checked_grad("unlearning gradient", loss, plist, allow_unused=True)):
            if g is not None:
                grads[n] += w * g.detach().float()
        weight += w
    return grads, weight


def labelled_rows(batch: Mapping[str, Tensor]) -> int:
    """The number of examples of `batch` with a labelled position under the causal shift: the rows that
    `example_losses` gives a loss for, in the same order."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).any(-1).sum())


def forget_objective(
    model: nn.Module, batch: Mapping[str, Tensor], kind: str, params: Sequence[Tensor] | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, int]:
    """(objective to minimise, weight) of one forget batch for forget loss `kind` (see the module docstring).

    `params` (the parameters being updated) is needed by the normalised variants to measure per-example
    gradient norms. `weights` (one per labelled row, `labelled_rows`; plain `nll` and `unlikelihood`): each
    example's tokens count with its weight, the batch still averaged over its positions.
    """
    check_forget_loss(kind)
    if weights is not None and kind.endswith("_normalized"):  # before the forward: nothing to compute
        raise ValueError(f"forget_loss {kind!r} normalises each example itself; per-example weights apply to "
                         "'nll' and 'unlikelihood'")
    logits = model_logits(model, batch)
    base = kind.removesuffix("_normalized")
    if base == "nll":
        nll, example = token_nll(logits, batch)
        per_token = -nll
    else:
        per_token, example = _token_unlikelihood(logits, batch)
    if per_token.numel() == 0:
        return logits.sum() * 0.0, 0
    if weights is not None:
        rows = example.unique()
        if len(weights) != len(rows):
            raise ValueError(f"{len(weights)} example weights for a batch of {len(rows)} labelled examples")
        token_weight = weights.to(per_token.device, per_token.dtype)[torch.searchsorted(rows, example)]
        return (per_token * token_weight).sum() / per_token.numel(), int(per_token.numel())
    if not kind.endswith("_normalized"):
        return per_token.mean(), int(per_token.numel())
    if params is None:
        raise ValueError(f"forget_loss {kind!r} needs the parameters being updated to normalise per example")
    params = list(params)
    rows = example.unique()
    total = per_token.new_zeros(())
    for b in rows.tolist():
        loss_b = per_token[example == b].mean()
        grads = checked_grad("unlearning gradient", loss_b, params, retain_graph=True, allow_unused=True)
        norm = torch.sqrt(sum((g.float().pow(2).sum() for g in grads if g is not None), torch.zeros(())))
        total = total + loss_b / norm.clamp_min(1e-12).detach()
    return total / len(rows), len(rows)


def npo_objective(
    model: nn.Module, reference: nn.Module, batch: Mapping[str, Tensor], beta: float
) -> tuple[Tensor, int]:
    """Negative preference optimisation (Zhang et al., 2024): `(2/β) mean_i log(1 + (π_θ(y_i|x_i)/π_ref(y_i|x_i))^β)`
    with `log π(y|x)` the sum of the labelled tokens' log-likelihoods of example i. Returns (loss, examples)."""
    logits = model_logits(model, batch)
    nll, example = token_nll(logits, batch)
    if nll.numel() == 0:
        return logits.sum() * 0.0, 0
    with torch.no_grad():
        ref_nll, _ = token_nll(model_logits(reference, batch), batch)
    n_rows = int(example.max()) + 1
    logp = torch.zeros(n_rows, device=nll.device).index_add(0, example, -nll)
    ref_logp = torch.zeros(n_rows, device=nll.device).index_add(0, example, -ref_nll)
    rows = example.unique()
    log_ratio = (logp - ref_logp)[rows]
    loss = (2.0 / beta) * F.softplus(beta * log_ratio).mean()
    return loss, len(rows)


def simnpo_objective(
    model: nn.Module, batch: Mapping[str, Tensor], beta: float, gamma: float = 0.0
) -> tuple[Tensor, int]:
    """SimNPO (Fan et al., 2024), reference-free and length-normalised NPO:
    `mean_i -(2/β) log σ(-(β/|y_i|) log π_θ(y_i|x_i) - γ)`, with `log π(y|x)` the sum of example i's labelled
    tokens' log-likelihoods and `|y_i|` their number (so `-log π/|y|` is the example's mean token NLL). Returns
    (loss, examples).

    Its gradient is `2σ(γ - β·mean NLL_i)` times example i's NLL-ascent gradient: a weight that fades as the example
    is forgotten (bounded loss), not one that grows on saturated tokens (see docs/recipe.md §5)."""
    logits = model_logits(model, batch)
    nll, example = token_nll(logits, batch)
    if nll.numel() == 0:
        return logits.sum() * 0.0, 0
    n_rows = int(example.max()) + 1
    nll_sum = nll.new_zeros(n_rows).index_add(0, example, nll)
    length = nll.new_zeros(n_rows).index_add(0, example, torch.ones_like(nll))
    rows = example.unique()
    mean_nll = nll_sum[rows] / length[rows]
    loss = -(2.0 / beta) * F.logsigmoid(beta * mean_nll - gamma).mean()
    return loss, len(rows)
