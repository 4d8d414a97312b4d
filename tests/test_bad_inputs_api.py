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
