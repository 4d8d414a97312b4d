"""Every backend on tiny LLMs, and the diagonal Fisher against brute force."""

import warnings

import pytest
import torch

from lightning_unlearn.curvature import KFAC, DiagonalFisher, HessianFree, WoodFisher, gradient
from lightning_unlearn.curvature.objective import CrossEntropyObjective, model_logits
from lightning_unlearn.models import small_causal_lm

BACKENDS = {"kfac": KFAC, "cg": HessianFree, "woodfisher": WoodFisher, "diagonal": DiagonalFisher}


def lm_batch(seed: int, rows: int = 3, length: int = 12, vocab: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, length // 2:] = -100  # a padded tail
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_all_four_backends_give_finite_newton_directions_and_report_memory(arch, capsys):
    model = small_causal_lm(arch)
    forget = lm_batch(99)
    for name, cls in BACKENDS.items():
        kwargs = {"max_iter": 10} if name == "cg" else {}
        curvature = cls(model, **kwargs)
        for seed in range(2):
            curvature.accumulate(lm_batch(seed))
        curvature.finalize()
        loss = CrossEntropyObjective().loss(model_logits(model, forget), forget)
        g = gradient(model, loss, curvature.param_names)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="cg: not converged")  # CG capped at 10 iterations here
            direction = curvature.apply(g, damping=1e-2)
        assert all(torch.isfinite(d).all() for d in direction.values()), name
        inner = sum(float((g[n] * direction[n]).sum()) for n in g)
        assert inner > 0, f"{name}: (C + λI)^-1 is positive definite, so <g, d> must be > 0"
        footprint = curvature.memory_footprint()
        assert footprint["total"] > 0
        print(f"{arch} {name}: {footprint}")
    out = capsys.readouterr().out
    assert all(f"{arch} {name}:" in out for name in BACKENDS)


def brute_force_diagonal(model, batches, fisher_type="empirical"):
    """Per-example gradients of the summed token loss, squared and summed, over the number of valid tokens."""
    objective = CrossEntropyObjective()
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            one = {k: v[row:row + 1] for k, v in batch.items()}
            pos = objective.positions(model_logits(model, one), one)
            if pos.count == 0:
                continue
            loss = objective.per_position_loss(pos.outputs, pos.targets).sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    total[n] += g.pow(2)
            count += pos.count
    return {n: t / count for n, t in total.items()}


def test_diagonal_fisher_equals_brute_force_and_its_powers_are_exact():
    model = small_causal_lm("gpt2", vocab_size=32, hidden=8, layers=1, heads=2).double()
    batches = [lm_batch(s, vocab=32) for s in range(2)]
    diag = DiagonalFisher(model, fisher_type="empirical")
    for b in batches:
        diag.accumulate(b)
    diag.finalize()
    expected = brute_force_diagonal(model, batches)
    for n in diag.param_names:
        torch.testing.assert_close(diag.diagonal[n], expected[n].float(), rtol=1e-4, atol=1e-9)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    quarter = v
    for _ in range(4):
        quarter = diag.apply(quarter, damping=0.1, power=-0.25)
    full = diag.apply(v, damping=0.1, power=-1.0)
    for n in v:
        torch.testing.assert_close(quarter[n], full[n], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(full[n], v[n] / (expected[n] + 0.1), rtol=1e-4, atol=1e-10)


def test_diagonal_padding_is_ignored_and_halves_add_up():
    model = small_causal_lm("gpt2", vocab_size=32, hidden=8, layers=1, heads=2).double()
    batch = lm_batch(3, vocab=32)
    whole = DiagonalFisher(model, fisher_type="empirical")
    whole.accumulate(batch)
    whole.finalize()
    halves = DiagonalFisher(model, fisher_type="empirical")
    halves.accumulate({k: v[:1] for k, v in batch.items()})
    halves.accumulate({k: v[1:] for k, v in batch.items()})
    halves.finalize()
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :4])], dim=1) for k, v in batch.items()}
    padded["labels"][:, -4:] = -100
    pad = DiagonalFisher(model, fisher_type="empirical")
    pad.accumulate(padded)
    pad.finalize()
    for n in whole.param_names:
        torch.testing.assert_close(halves.diagonal[n], whole.diagonal[n])
        torch.testing.assert_close(pad.diagonal[n], whole.diagonal[n])


def test_diagonal_state_dict_subtract_and_errors():
    model = small_causal_lm("gpt2", vocab_size=32, hidden=8, layers=1, heads=2)
    a, b = lm_batch(1, vocab=32), lm_batch(2, vocab=32)
    full = DiagonalFisher(model, fisher_type="empirical")
    full.accumulate(a)
    full.accumulate(b)
    full.finalize()
    part = DiagonalFisher(model, fisher_type="empirical")
    part.accumulate(b)
    part.finalize()
    only_a = DiagonalFisher(model, fisher_type="empirical")
    only_a.accumulate(a)
    only_a.finalize()
    restored = DiagonalFisher(model)
    restored.load_state_dict(full.state_dict())
    restored.subtract(part)
    for n in full.param_names:
        torch.testing.assert_close(restored.diagonal[n], only_a.diagonal[n], rtol=1e-4, atol=1e-7)
    fresh = DiagonalFisher(model)
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="before finalize"):
        fresh.apply(v, damping=1.0)
    with pytest.raises(ValueError, match="damping must be"):
        full.apply(v, damping=0.0)
    bad = dict(v)
    first = next(iter(bad))
    bad[first] = torch.zeros(3)
    with pytest.raises(ValueError, match="has shape"):
        full.apply(bad, damping=1.0)
    with pytest.raises(ValueError, match="fisher_type"):
        DiagonalFisher(model, fisher_type="exact")
    nan_model = small_causal_lm("gpt2", vocab_size=32, hidden=8, layers=1, heads=2)
    with torch.no_grad():
        nan_model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    broken = DiagonalFisher(nan_model, fisher_type="empirical")
    broken.accumulate(a)
    with pytest.raises(FloatingPointError, match="non-finite .* of parameter '"):
        broken.finalize()
