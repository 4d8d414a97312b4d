"""What bounds a run: measured losses, never a prediction alone, and a holdout that is checked before it is trusted.

- a retain-free request with no holdout has nothing to measure the damage on: refused before any step;
- a NaN loss (one forward, or every forward from some point on) is a rolled-back trial, with or without a holdout
  target, through the API and the command;
- a holdout that is (or holds) forget or retain examples is refused; one that does not look like never-seen data of
  the forget set's kind is warned about.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from bad_input_fixtures import make_project, run_cli
from canary_corpus import V, memorise

from lightning_unlearn.callbacks import Unlearn
from lightning_unlearn.errors import EXIT_NOTHING_ACCEPTED, UserInputError
from lightning_unlearn.methods import NothingAcceptedWarning, build_curvature, build_unlearner
from lightning_unlearn.methods.holdout import HoldoutWarning


@pytest.fixture(scope="module")
def memorised():
    return memorise("gpt2")  # 4 memorised digit canaries, retain batches, a never-trained held batch, 8 unseen ones


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def rows(batch: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in batch.items()}


def join(*batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------------------------- retain-free
def test_a_retain_free_request_without_holdout_is_refused_before_any_step(memorised):
    """The README's retain-free request without its holdout: nothing measures the damage, and the curvature's
    prediction alone let a tiny Qwen2 end with every loss near 14 nats. Refused, naming what to pass."""
    base, forget, retain, _, holdout = memorised
    model = copy.deepcopy(base)
    full = build_curvature("kfac", model).fit([*retain, forget])
    before = weights(model)
    with pytest.raises(UserInputError, match=r"nothing to measure the damage on.*holdout=.*retain=.*"
                                             r"max_retain_increase=None"):
        Unlearn(curvature_data="full_minus_forget", full_curvature=full).unlearn(model, forget=[forget])
    u = build_unlearner("newton", model, curvature_data="full_minus_forget", full_curvature=full)
    with pytest.raises(UserInputError, match="nothing to measure the damage on"):
        u.fit([forget])
    for method in ("gradient_ascent", "npo"):  # the first-order methods have not even a prediction
        with pytest.raises(UserInputError, match="nothing to measure the damage on"):
            build_unlearner(method, model).fit([forget])
    assert same_weights(model, before) and not u.history
    # with holdout data, the same request runs: the budget is measured on the holdout
    callback = Unlearn(curvature_data="full_minus_forget", full_curvature=full)
    records = callback.unlearn(model, forget=[forget], holdout=[holdout])
    assert records and all(r.retain_loss is not None for r in records)


# ---------------------------------------------------------------------------------------------- NaN
class NaNLogits:
    """A forward hook on the LM head: NaN logits whenever the weights are not the ones the run started from
    (`every=True`), or only at the first such forward (a single overflow)."""

    def __init__(self, model: torch.nn.Module, every: bool) -> None:
        self.model, self.start, self.every, self.fired = model, weights(model), every, 0
        self.handle = model.lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        moved = not same_weights(self.model, self.start)
        if moved and (self.every or self.fired == 0):
            self.fired += 1
            return output * float("nan")
        return output


@pytest.mark.parametrize("step_search", [True, False])
def test_nan_logits_at_every_trial_with_a_holdout_target_are_rolled_back(memorised, step_search):
    """NaN losses were binned into the holdout histogram (IndexError: index -9223372036854775808) and the model
    kept the trial. Now every such trial is rolled back: nothing accepted, the weights bit for bit."""
    base, forget, retain, held, holdout = memorised
    model = copy.deepcopy(base)
    before = weights(model)
    hook = NaNLogits(model, every=True)
    kwargs = {} if step_search else {"step_search": False, "scale": 1e12}
    u = build_unlearner("newton", model, max_retries=1, **kwargs)
    with pytest.warns(NothingAcceptedWarning):
        records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    hook.handle.remove()
    assert hook.fired > 0 and u.status == "nothing_accepted" and records
    assert not any(r.accepted for r in records) and {r.reason for r in records} <= {"non_finite", "trust_region"}
    assert same_weights(model, before)
    assert u.summary()["target_source"] == "holdout"


def test_a_single_nan_forward_costs_one_point_of_the_search(memorised):
    base, forget, retain, held, holdout = memorised
    model = copy.deepcopy(base)
    hook = NaNLogits(model, every=False)
    u = build_unlearner("newton", model)
    records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    hook.handle.remove()
    accepted = [r for r in records if r.accepted]
    assert hook.fired == 1 and accepted, records
    assert all(math.isfinite(r.forget_loss) and math.isfinite(r.forget_score) and math.isfinite(r.retain_loss)
               for r in accepted)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert u.summary()["forget_loss_after"] > u.summary()["forget_loss_before"] + 1.0


def test_forget_score_of_non_finite_losses_is_nan_not_an_index_error(memorised):
    base, forget, _, _, holdout = memorised
    model = copy.deepcopy(base)
    u = build_unlearner("newton", model)
    u.calibrate([holdout])
    with torch.no_grad():
        model.lm_head.weight.mul_(1e38).mul_(1e38)  # inf weights: NaN logits for forget and holdout alike
    score, loss = u.forget_score([forget])
    assert math.isnan(score) and not math.isfinite(loss)


def test_the_command_rolls_back_a_nan_step_and_exits_3(tmp_path):
    """`fit --model.scale 1e12 --model.method_kwargs '{step_search: false}'` with the data module's holdout
    target exited 1 with the IndexError; it rolls back and exits 3, writing nothing. (The project's model is
    untrained, so the target is the top of the holdout, `target_score=1`: with 40 % of the texts held out, the 3
    forget examples are all above every holdout example, the target met before a step, with a chance below 1/500.)"""
    torch.manual_seed(0)
    project = make_project(tmp_path / "user")
    output = tmp_path / "out"
    settings = {"step_search": False, "target_score": 1.0}
    code, out, err = run_cli(["fit", "--config", str(project.config), "--output", str(output),
                              "--data.holdout_fraction", "0.4", "--model.scale", "1e12",
                              "--model.method_kwargs", json.dumps(settings)], project.root)
    assert code == EXIT_NOTHING_ACCEPTED, (code, err[-3000:])
    assert "Traceback" not in err and "IndexError" not in out + err
    assert "nothing accepted" in out and not output.exists()
    assert project.snapshot() == project.initial


# ---------------------------------------------------------------------------------------------- the holdout
@pytest.mark.parametrize("case", ["the forget batch", "two forget examples among unseen ones", "retain examples"])
def test_a_holdout_of_trained_examples_is_refused(memorised, case):
    """A holdout that is the forget batch gave target_reached after 0 steps with unchanged weights."""
    base, forget, retain, held, holdout = memorised
    model = copy.deepcopy(base)
    before = weights(model)
    bad = {"the forget batch": forget, "two forget examples among unseen ones": join(rows(holdout, slice(0, 6)),
                                                                                    rows(forget, slice(0, 2))),
           "retain examples": retain[1]}[case]
    what = "retain" if case == "retain examples" else "forget"
    u = build_unlearner("newton", model)
    with pytest.raises(UserInputError, match=rf"holdout: of its \d+ examples, \d+ are {what} examples \(the same "
                                             r"token ids\).*never-trained examples of the forget set's kind"):
        u.fit([forget], retain, held_retain_batch=held, holdout_batches=[bad])
    assert same_weights(model, before) and not u.history


def holdout_warnings(model, forget, retain, held, holdout) -> list[str]:
    u = build_unlearner("newton", model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    return [str(w.message) for w in caught if issubclass(w.category, HoldoutWarning)]


def test_a_proper_holdout_passes_without_a_word(memorised):
    base, forget, retain, held, holdout = memorised
    assert holdout_warnings(copy.deepcopy(base), forget, retain, held, holdout) == []


def test_a_holdout_of_memorised_examples_is_warned_about(memorised):
    """Two memorised canaries as the holdout of the other two: as low as the forget set, the target is met at once."""
    base, forget, retain, held, _ = memorised
    said = holdout_warnings(copy.deepcopy(base), rows(forget, slice(0, 2)), retain, held, rows(forget, slice(2, 4)))
    assert len(said) == 1 and "holdout: its loss before unlearning" in said[0], said
    assert "never-trained examples of the forget set's kind" in said[0]


def test_a_holdout_of_trained_retain_text_is_warned_about(memorised):
    """Trained retain texts that are not among the retain data given: below the retain data's loss, and not of the
    forget set's kind (whole texts over every token, where the forget labels are digits)."""
    base, forget, retain, _, _ = memorised
    said = holdout_warnings(copy.deepcopy(base), forget, [retain[0]], retain[2], retain[1])
    assert any("is below the retain data's" in m for m in said), said
    assert any("of its labelled tokens occur among the forget set's labelled tokens" in m for m in said), said


def test_a_holdout_of_random_tokens_is_warned_about(memorised):
    """Random tokens in the canaries' span: not data of the forget set's kind (on this small memorising model their
    loss cannot tell them from never-seen canaries; the tokens can)."""
    base, forget, retain, held, holdout = memorised
    noise = {k: v.clone() for k, v in holdout.items()}
    span = noise["labels"] != -100
    noise["input_ids"][span] = torch.randint(0, V, (int(span.sum()),), generator=torch.Generator().manual_seed(1))
    noise["labels"][span] = noise["input_ids"][span]
    said = holdout_warnings(copy.deepcopy(base), forget, retain, held, noise)
    assert len(said) == 1 and "does not look like data of the forget set's kind" in said[0], said
