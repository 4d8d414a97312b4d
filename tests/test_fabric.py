"""The engine driven from Fabric: 2 CPU processes (gloo, `ddp_spawn`) give the curvature and the update of one
process on the same global data; sharded strategies are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader

from lightning_unlearn.distributed import leave_process_group
from lightning_unlearn.fabric import fabric_curvature, fabric_unlearn
from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.strategies import UnsupportedStrategyError, check_strategy

SEQ = 16
TRAIN = ["the cat sees a dog", "a bird likes sun", "my aunt reads", "old trees grow", "zq7 kx9 vv2 pq4",
         "red balls roll", "wm3 hh6 xr1 bt5", "the sky is big"]
FORGET = ["zq7 kx9 vv2 pq4", "wm3 hh6 xr1 bt5"]
HELD = ["a dog runs home", "the sun is red"]


def encode(text: str) -> dict[str, torch.Tensor]:
    ids = [ord(c) % 127 for c in text[:SEQ]]
    n = len(ids)
    return {"input_ids": torch.tensor(ids + [127] * (SEQ - n)),
            "attention_mask": torch.tensor([1] * n + [0] * (SEQ - n)),
            "labels": torch.tensor(ids + [-100] * (SEQ - n))}


def loader(texts: list[str], batch_size: int) -> DataLoader:
    return DataLoader([encode(t) for t in texts], batch_size=batch_size)


# the fixed step (absolute λ, no step-length search): the update is a continuous function of the reduced
# statistics, so two processes match one to float precision (a search's accept/bisect decisions could flip on
# rounding noise); the default recipe is tested below
FIXED = {"damping": 1e-2, "scale": 0.1, "steps": 2, "damping_mode": "absolute", "step_search": False}


def run(fabric: Fabric, out: Path) -> None:
    """Curvature checkpoint of TRAIN, then a full_minus_forget request; the same code on 1 or 2 processes."""
    model = fabric.setup(small_causal_lm("gpt2", seed=0))
    full = fabric_curvature(fabric, model, loader(TRAIN, 2), "kfac", fisher_type="empirical")
    records = fabric_unlearn(fabric, model, loader(FORGET, 1), method="newton", curvature="kfac",
                             curvature_data="full_minus_forget", full_curvature=full,
                             held_retain_batch=next(iter(loader(HELD, 2))), max_retain_increase=None,
                             curvature_kwargs={"fisher_type": "empirical"}, **FIXED)
    result = {"weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
              "curvature": full.state_dict(), "records": [r.to_dict() for r in records],
              "status": records.status}
    if fabric.is_global_zero:  # a file: the spawn launcher's return queue blocks on large results
        torch.save(result, out)
    # leave together, the DDP wrapper (whose reducer holds the process group) dropped first: see leave_process_group
    del model, full, records, result
    leave_process_group()


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def test_fabric_two_processes_match_one(tmp_path: Path) -> None:
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(run, tmp_path / "two.pt")
    run(Fabric(accelerator="cpu", devices=1), tmp_path / "one.pt")
    two, one = load(tmp_path / "two.pt"), load(tmp_path / "one.pt")
    assert len(one["records"]) == 2 and all(r["accepted"] for r in one["records"])
    assert isinstance(one["records"], list) and one["status"] == two["status"] == "budget_exhausted"
    assert [r["accepted"] for r in two["records"]] == [r["accepted"] for r in one["records"]]
    for a, b in zip(two["records"], one["records"]):
        assert a["forget_loss"] == pytest.approx(b["forget_loss"], rel=1e-4)
        assert a["retain_loss"] == pytest.approx(b["retain_loss"], rel=1e-4)
    assert float(two["curvature"]["count"]) == float(one["curvature"]["count"])
    for name, layer in one["curvature"]["layers"].items():  # the factors were all-reduced
        torch.testing.assert_close(two["curvature"]["layers"][name]["A"], layer["A"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two["curvature"]["layers"][name]["G"], layer["G"], rtol=1e-4, atol=1e-6)
    start = small_causal_lm("gpt2", seed=0).state_dict()
    moved = sum(float((v - start[k]).abs().sum()) for k, v in one["weights"].items())
    assert moved > 1e-3
    for name, value in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], value, rtol=1e-4, atol=1e-6)


def test_fabric_refuses_sharded_strategies() -> None:
    from lightning.fabric.strategies import FSDPStrategy

    for strategy in (FSDPStrategy(),):
        with pytest.raises(UnsupportedStrategyError, match=f"does not support the {type(strategy).__name__}"):
            check_strategy(strategy, "fabric_unlearn")
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric._strategy = FSDPStrategy()  # a CPU machine cannot build a real FSDP Fabric; the check reads the type
    with pytest.raises(UnsupportedStrategyError, match="does not support the FSDPStrategy strategy"):
        fabric_unlearn(fabric, small_causal_lm("gpt2"), loader(FORGET, 1), loader(TRAIN, 2))


def test_fabric_default_recipe_stops_at_the_holdout_target() -> None:
    from canary_corpus import memorise

    model, forget, retain, held, holdout = memorise("gpt2")  # 4 memorised digit canaries, 8 unseen ones
    fabric = Fabric(accelerator="cpu", devices=1)
    records = fabric_unlearn(fabric, model, [forget], retain, held_retain_batch=held, holdout=[holdout])
    summary = records.summary  # no knob set: relative damping, step search, up to 5 steps
    assert records.status == summary["status"] == "target_reached" and summary["target_source"] == "holdout"
    assert records[-1].reason == "target_reached" and all(r.accepted for r in records)
    assert all(r.damping == 0.1 for r in records)  # ρ = 0.1 relative to each layer's curvature scale
    assert summary["forget_loss_after"] > summary["forget_loss_before"] + 1.0, summary
    assert summary["retain_loss_after"] <= 1.05 * summary["retain_loss_before"], summary
