"""Faulty or unusual input through the Python API (`serve_request`, `Unlearner.fit`, `UnlearnSettings`): each case
either runs as the same data in the expected form would, or fails with a `UserInputError` that names the problem and
the fix, never a raw error from inside torch; a rolled-back trial never stays in the caller's model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_unlearn.errors import UserInputError
from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods.inputs import UnlabelledForgetRowsWarning
from lightning_unlearn.methods.records import RunTrustRegionWarning
from lightning_unlearn.request import retain_read_limit, serve_request
from lightning_unlearn.settings import UnlearnSettings

VOCAB, LENGTH, POSITIONS = 64, 16, 32


def batch(seed: int, rows: int = 8, length: int = LENGTH) -> dict[str, torch.Tensor]:
    """Random token rows whose second half repeats the first (learnable), labelled everywhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    ids[:, length // 2:] = ids[:, : length - length // 2]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture(scope="module")
def data():
    return [batch(100 + i) for i in range(2)], [batch(200 + i) for i in range(6)], [batch(300 + i) for i in range(2)]


@pytest.fixture(scope="module")
def trained(data):
    """A tiny GPT-2 (learned positions: 32) trained on retain and forget, forget twice as often."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=POSITIONS))
    forget, retain, _ = data
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        b = (retain + forget * 2)[step % 10]
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def fresh(trained):
    return copy.deepcopy(trained)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unchanged(model, before) -> bool:
    return all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_a_holdout_given_as_a_generator_sets_the_target_as_a_list_does(trained, data):
    forget, retain, holdout = data
    listed = build_unlearner("newton", fresh(trained), steps=1)
    listed.fit(forget, retain, holdout_batches=holdout)
    generated = build_unlearner("newton", fresh(trained), steps=1)
    generated.fit(forget, retain, holdout_batches=(b for b in holdout))
    assert generated.summary()["target_source"] == listed.summary()["target_source"] == "holdout"
    assert generated.summary()["target"] == pytest.approx(listed.summary()["target"])


def test_fit_takes_the_held_batch_and_the_holdout_by_keyword_only(trained, data):
    forget, retain, holdout = data
    with pytest.raises(TypeError):
        build_unlearner("newton", fresh(trained)).fit(forget, retain, holdout[0])  # serve_request's order


@pytest.mark.parametrize("method, kwargs", [("gradient_ascent", {"lr": 50.0}),
                                            ("newton", {"step_search": False, "scale": 1e3})])
def test_a_log_that_raises_on_a_rolled_back_trial_leaves_the_weights_of_before(trained, data, method, kwargs):
    forget, retain, holdout = data
    model = fresh(trained)
    before, seen = weights(model), []

    def log(record):
        seen.append(record)
        if not record.accepted:
            raise KeyboardInterrupt  # Ctrl-C, or a logger failing while the record goes out

    with pytest.raises(KeyboardInterrupt):
        build_unlearner(method, model, log=log, **kwargs).fit(forget, retain, holdout_batches=holdout)
    assert seen and not seen[-1].accepted
    assert all(r.accepted is False for r in seen)  # nothing was accepted before the interrupt ...
    assert unchanged(model, before)  # ... so the model holds the weights it came with


def test_a_request_under_no_grad_runs_and_under_inference_mode_is_refused(trained, data):
    forget, retain, holdout = data
    with torch.no_grad():
        result = serve_request(fresh(trained), forget, retain, holdout, settings=UnlearnSettings(steps=1))
    assert result.summary["steps_accepted"] >= 0 and result.status
    model = fresh(trained)
    before = weights(model)
    with torch.inference_mode(), pytest.raises(UserInputError, match="inference_mode"):
        serve_request(model, forget, retain, holdout)
    assert unchanged(model, before)


def test_sequences_longer_than_the_learned_positions_are_refused_by_name(trained, data):
    _, retain, holdout = data
    with pytest.raises(UserInputError, match=f"{POSITIONS + 8} tokens.*hold {POSITIONS}"):
        serve_request(fresh(trained), [batch(1, length=POSITIONS + 8)], retain, holdout)


def test_integer_labels_of_another_width_are_read_and_float_labels_refused(trained, data):
    forget, retain, holdout = data
    narrow = [{**b, "labels": b["labels"].int()} for b in forget]
    a = fresh(trained)
    b = fresh(trained)
    serve_request(a, narrow, retain, holdout, settings=UnlearnSettings(steps=1))
    serve_request(b, forget, retain, holdout, settings=UnlearnSettings(steps=1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    floats = [{**b, "labels": b["labels"].float()} for b in forget]
    with pytest.raises(UserInputError, match="labels are float32.*labels.long"):
        serve_request(fresh(trained), floats, retain, holdout)


def test_negative_token_ids_are_refused_as_a_padding_mistake(trained, data):
    forget, retain, holdout = data
    padded = {**forget[0], "input_ids": forget[0]["input_ids"].clone()}
    padded["input_ids"][:, -2:] = -100
    with pytest.raises(UserInputError, match="negative token ids.*attention_mask"):
        serve_request(fresh(trained), [padded], retain, holdout)


def test_settings_as_a_dict_and_one_batch_as_a_dict_are_read(trained, data):
    forget, retain, holdout = data
    a, b = fresh(trained), fresh(trained)
    serve_request(a, forget[0], retain, holdout, settings={"steps": 1})
    serve_request(b, [forget[0]], retain, holdout, settings=UnlearnSettings(steps=1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(UserInputError, match="settings must be an UnlearnSettings"):
        serve_request(fresh(trained), forget, retain, holdout, settings=["steps", 1])
    with pytest.raises(UserInputError, match="unknown setting 'stepz'"):
        serve_request(fresh(trained), forget, retain, holdout, settings={"stepz": 1})


@pytest.mark.parametrize("field, value", [("curvature", "cg"), ("curvature_data", "forget"), ("fisher_type", "mc"),
                                          ("refresh_every", 2), ("curvature_kwargs", {"dampng": 1})])
def test_curvature_settings_on_a_first_order_method_are_refused_not_ignored(field, value):
    with pytest.raises(UserInputError, match=f"{field} applies to the second-order methods.*'npo'"):
        UnlearnSettings(method="npo", **{field: value})
    UnlearnSettings(method="npo", curvature_batches=1)  # shared by every method's settings: allowed


def test_an_unknown_fisher_type_is_refused_at_construction():
    with pytest.raises(UserInputError, match="fisher_type for curvature 'kfac' must be one of mc, empirical"):
        UnlearnSettings(fisher_type="exact")
    UnlearnSettings(fisher_type="empirical")


def test_an_empty_retain_list_is_no_retain_data_on_one_process(trained, data):
    forget, _, holdout = data
    settings = UnlearnSettings(curvature_data="forget", steps=1)
    result = serve_request(fresh(trained), forget, [], holdout, settings=settings)
    assert result.summary["steps_accepted"] >= 0
    with pytest.raises(UserInputError, match="curvature_data='retain' needs retain"):
        serve_request(fresh(trained), forget, [], holdout)


def test_a_long_retain_loader_is_read_only_as_far_as_the_request_uses_it(trained, data):
    forget, _, holdout = data
    read = []

    def whole_training_set():
        for i in range(400):
            read.append(i)
            yield batch(5000 + i)

    settings = UnlearnSettings(curvature_batches=4, steps=2)
    serve_request(fresh(trained), forget, whole_training_set(), holdout, settings=settings)
    assert len(read) == retain_read_limit(settings, 1) == 5  # 4 curvature batches and the held one
    assert retain_read_limit(UnlearnSettings(method="gradient_difference"), 2) == 2 * 101  # 100 steps, 2 processes
    assert retain_read_limit(UnlearnSettings(curvature_batches=None), 1) is None


@pytest.mark.parametrize("which", ["forget", "retain", "holdout"])
def test_a_set_labelled_nowhere_is_refused_by_name(trained, data, which):
    sets = dict(zip(("forget", "retain", "holdout"), data))
    sets[which] = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in sets[which]]
    with pytest.raises(UserInputError, match=f"the {which} batches have no position with a label"):
        serve_request(fresh(trained), sets["forget"], sets["retain"], sets["holdout"])
    with pytest.raises(UserInputError, match=f"the {which} batches have no position with a label"):
        build_unlearner("newton", fresh(trained)).fit(sets["forget"], sets["retain"],
                                                      holdout_batches=sets["holdout"])


def test_a_compiled_model_unlearns_as_the_plain_one_and_shares_its_curvature_checkpoints(trained, data, tmp_path):
    """`torch.compile` prefixes parameter names with `_orig_mod.`: a curvature checkpoint saved from the compiled model
    named no parameter of the plain one (refused as "saved from another model"), and the reverse. The engine works on
    the module the wrapper holds, so both load either checkpoint, and a request gives the same weights."""
    from lightning_unlearn.checkpoint import load_curvature_state, save_curvature
    from lightning_unlearn.curvature.registry import build_curvature

    forget, retain, holdout = data
    plain, compiled = fresh(trained), torch.compile(fresh(trained), backend="eager")
    for source, target in ((compiled, plain), (plain, compiled)):
        path = tmp_path / f"{type(source).__name__}.safetensors"
        curvature = build_curvature("kfac", source).fit(retain)
        assert not any(n.startswith("_orig_mod.") for n in curvature.param_names)
        save_curvature(curvature, path)
        assert load_curvature_state(path, model=target)
    serve_request(plain, forget, retain, holdout, settings=UnlearnSettings(steps=2))
    serve_request(compiled, forget, retain, holdout, settings=UnlearnSettings(steps=2))
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), compiled._orig_mod.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(plain.parameters(), trained.parameters()))


def test_steps_that_grow_the_weights_stop_at_the_run_trust_region(trained, data):
    """Relative damping 1e-12 gives steps the outputs barely see; each fits the per-step trust region (‖Δθ‖ ≤ ‖θ‖),
    and before the run-level bound 7 of them grew the weights' norm 30-fold with the forget loss unchanged."""
    forget, retain, holdout = data
    model = fresh(trained)
    start = torch.cat([p.detach().flatten() for p in model.parameters()]).norm()
    with pytest.warns(RunTrustRegionWarning, match="raise the damping"):
        build_unlearner("newton", model, damping=1e-12).fit(forget, retain, holdout_batches=holdout)
    end = torch.cat([p.detach().flatten() for p in model.parameters()]).norm()
    assert float(end / start) <= 2.0 + 1e-6  # moved by at most ‖θ₀‖ in all


def test_retain_data_holding_forget_examples_is_refused_with_counts(trained, data):
    forget, retain, holdout = data
    with pytest.raises(UserInputError, match=r"8 of the \d+ retain examples are forget examples"):
        serve_request(fresh(trained), forget, forget[:1] + retain[:4], holdout)  # the last batch is the held one
    with pytest.raises(UserInputError, match="8 of the 8 held retain examples are forget examples"):
        build_unlearner("newton", fresh(trained)).fit(forget, retain, held_retain_batch=forget[0],
                                                      holdout_batches=holdout)


def test_labels_on_padding_are_refused(trained, data):
    forget, retain, holdout = data
    padded = {k: v.clone() for k, v in forget[0].items()}
    padded["attention_mask"][0] = 0  # a row of padding that still carries its labels
    with pytest.raises(UserInputError, match=r"16 labelled position\(s\) where attention_mask is 0.*= -100"):
        serve_request(fresh(trained), [padded, forget[1]], retain, holdout)
    padded["labels"][padded["attention_mask"] == 0] = -100
    serve_request(fresh(trained), [padded, forget[1]], retain, holdout, settings=UnlearnSettings(steps=1))


def test_a_retain_term_without_retain_data_is_refused_not_dropped(trained, data):
    forget, _, holdout = data
    with pytest.raises(UserInputError, match="retain_weight=1.*no retain batch"):
        build_unlearner("gradient_difference", fresh(trained)).fit(forget, [], holdout_batches=holdout)
    build_unlearner("gradient_difference", fresh(trained), retain_weight=0, steps=1).fit(forget, [],
                                                                                          holdout_batches=holdout)


def test_labels_on_the_first_token_only_are_no_labels(trained, data):
    """Position 0 is never predicted (no token before it): a set labelled only there is refused, and forget rows
    labelled only there are named in a warning (they are not unlearned)."""
    forget, retain, holdout = data
    first_only = []
    for b in forget:
        labels = torch.full_like(b["labels"], -100)
        labels[:, 0] = b["labels"][:, 0]
        first_only.append({**b, "labels": labels})
    with pytest.raises(UserInputError, match="forget batches have no position with a label the loss reads"):
        serve_request(fresh(trained), first_only, retain, holdout)
    with pytest.warns(UnlabelledForgetRowsWarning, match="8 of the 16 forget rows have no label the loss reads"):
        serve_request(fresh(trained), [first_only[0], forget[1]], retain, holdout, settings=UnlearnSettings(steps=1))


def test_malformed_batch_fields_are_refused_by_name(trained, data):
    forget, retain, holdout = data
    cases = [({"attention_mask": forget[0]["attention_mask"][:, :-1]}, "attention_mask has shape"),
             ({"input_ids": forget[0]["input_ids"].to(torch.uint8)}, r"input_ids are uint8.*input_ids.long\(\)")]
    for change, message in cases:
        with pytest.raises(UserInputError, match=message):
            serve_request(fresh(trained), [{**forget[0], **change}], retain, holdout)
    no_labels = {k: v for k, v in forget[0].items() if k != "labels"}
    with pytest.raises(UserInputError, match="forget batch 0 has input_ids but no labels"):  # the engine: refused
        build_unlearner("newton", fresh(trained)).fit([no_labels], retain, holdout_batches=holdout)
    a, b = fresh(trained), fresh(trained)  # the request: labels default to input_ids, padding masked
    serve_request(a, [no_labels, forget[1]], retain, holdout, settings=UnlearnSettings(steps=1))
    serve_request(b, forget, retain, holdout, settings=UnlearnSettings(steps=1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_adam_on_float16_weights_is_refused_and_sgd_runs(trained, data):
    forget, retain, holdout = data
    half = fresh(trained).to(torch.float16)
    with pytest.raises(UserInputError, match="Adam on float16 weights.*bfloat16 or float32.*optimizer='sgd'"):
        build_unlearner("gradient_ascent", half)
    build_unlearner("gradient_ascent", half, optimizer="sgd", steps=1).fit(forget, retain, holdout_batches=holdout)
    assert all(p.dtype == torch.float16 and bool(torch.isfinite(p).all()) for p in half.parameters())


def test_a_model_whose_weights_were_never_loaded_is_refused(data):
    forget, retain, holdout = data
    with torch.device("meta"):
        empty = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=POSITIONS))
    with pytest.raises(UserInputError, match="on the meta device.*never loaded"):
        serve_request(empty, forget, retain, holdout)
    with pytest.raises(UserInputError, match="on the meta device"):
        build_unlearner("gradient_ascent", empty).fit(forget, retain, holdout_batches=holdout)


def test_a_second_fit_is_a_run_of_its_own(trained, data):
    """The summary counts this run's steps and reads this run's budget baseline (it kept the first run's: the second
    run then had the first's budget to spend, and barely moved)."""
    forget, retain, holdout = data
    model = fresh(trained)
    unlearner = build_unlearner("newton", model, steps=1, final_repeats=0)
    unlearner.fit(forget, retain, holdout_batches=holdout)
    first = unlearner.summary()
    records = unlearner.fit(forget, retain, holdout_batches=holdout)
    second = unlearner.summary()
    assert second["trials"] == len(records) and second["steps_accepted"] == sum(r.accepted for r in records)
    assert second["retain_loss_before"] == pytest.approx(first["retain_loss_after"], rel=1e-6)


def test_a_first_order_request_keeps_the_callers_gradients(trained, data):
    forget, retain, holdout = data
    model = fresh(trained)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    build_unlearner("gradient_ascent", model, steps=2).fit(forget, retain, holdout_batches=holdout)
    assert all(p.grad is not None and bool((p.grad == 1).all()) for p in model.parameters())
