"""`benchmarks.perturbation`: the perturbed starts are what its docstring says (relative size, seeded by the draw, the
original untouched) and the summary counts and ranks the draws correctly. The requests themselves run in the
benchmark (minutes), not here."""

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.perturbation import markdown, perturbed, summarize


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()


def _relative_change(a: torch.nn.Module, b: torch.nn.Module) -> float:
    moved = sum(float((p.detach() - q.detach()).double().pow(2).sum()) for p, q in zip(a.parameters(), b.parameters()))
    size = sum(float(q.detach().double().pow(2).sum()) for q in b.parameters())
    return math.sqrt(moved / size)


def test_perturbation_is_relative_seeded_and_leaves_the_original(model):
    before = [p.detach().clone() for p in model.parameters()]
    small, large = perturbed(model, 1e-4, 1), perturbed(model, 1e-3, 1)
    # E[(s |θ| z)^2] = s^2 θ^2: the relative change is the scale, within sampling noise
    assert _relative_change(small, model) == pytest.approx(1e-4, rel=0.1)
    assert _relative_change(large, model) == pytest.approx(1e-3, rel=0.1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    again, other = perturbed(model, 1e-4, 1), perturbed(model, 1e-4, 2)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), small.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(other.parameters(), small.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(perturbed(model, 1e-4, 0).parameters(), model.parameters()))


def test_perturbation_keeps_the_dtype(model):
    half = perturbed(copy.deepcopy(model).to(torch.bfloat16), 1e-3, 3)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def _row(kind, scale, draw, dppl, mia, gap, status="target_reached"):
    return {"kind": kind, "scale": scale, "draw": draw, "dppl_percent": dppl, "mia_auc": mia,
            "exposure_gap_bits": gap, "status": status}


def test_summary_groups_ranks_and_counts_the_bars():
    rows = [_row("perturbed", 0.0, 0, 0.1, 0.50, 0.2),
            _row("perturbed", 1e-4, 1, 0.2, 0.52, 0.1), _row("perturbed", 1e-4, 2, 4.0, 0.50, 0.3),
            _row("perturbed", 1e-4, 3, 0.5, 0.60, -0.1, "budget_exhausted"),
            _row("bfloat16", 0.0, 0, 3.0, 0.54, 0.0)]
    s = summarize(rows)
    assert set(s) == {"scale 0", "scale 0.0001", "bfloat16"}
    e = s["scale 0.0001"]
    assert e["draws"] == [1, 2, 3] and e["status"].count("budget_exhausted") == 1
    assert e["dppl_percent"]["median"] == 0.5 and e["dppl_percent"]["max"] == 4.0
    assert e["mia_auc"]["max"] == 0.60 and e["exposure_gap_bits"]["min"] == -0.1
    assert e["meets_bars"] == 1  # only draw 1: draw 2 fails perplexity, draw 3 the MIA bar
    assert s["bfloat16"]["meets_bars"] == 0 and s["scale 0"]["meets_bars"] == 1
    table = "\n".join(markdown(s, {}))
    assert "| scale 0.0001 | 3 | 1 budget_exhausted, 2 target_reached | +0.50 [" in table
    assert "1 of 3" in table
