"""Bad input to the engine (the unlearning methods: trust region, settings, batches, weights), from a user's saved
model and data: each case fails with an error that names the problem, or is refused by a guard, and the user's model
folder and training data stay byte-identical.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from bad_input_fixtures import (
    FORGET_IDS,
    make_project,
    run_cli,
    user_files_untouched,  # noqa: F401 - the autouse check of every case
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_unlearn.errors import UserInputError
from lightning_unlearn.methods import build_unlearner


@pytest.fixture(scope="module")
def engine_project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def loaded(engine_project):
    """(model, tokenizer, forget batch, retain batches, holdout batch) from the saved project, untrained weights."""
    model = AutoModelForCausalLM.from_pretrained(engine_project.model)
    tok = AutoTokenizer.from_pretrained(engine_project.model)
    rows = [json.loads(line) for line in engine_project.data.read_text().splitlines()]

    def batch(texts):
        enc = tok(texts, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}

    forget = batch([r["text"] for r in rows if r["id"] in FORGET_IDS])
    others = [r["text"] for r in rows if r["id"] not in FORGET_IDS]
    retain = [batch(others[i:i + 8]) for i in range(0, 24, 8)]
    holdout = batch(others[24:32])
    return model, tok, forget, retain, holdout


@pytest.fixture
def untouched(engine_project):
    """Asserts after the test that the saved model and the training data were not changed."""
    before = engine_project.snapshot()
    yield
    assert engine_project.snapshot() == before, "the user's model folder or training data changed"


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_huge_fixed_step_on_an_untrained_model_is_refused_by_the_trust_region(loaded, untouched):
    """scale 1e6 on an untrained model: the held retain loss does not move (3.783 before and after, weights at
    4.7e6), the trust region refuses it."""
    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    before = weights(model)
    u = build_unlearner("newton", model, scale=1e6, step_search=False, steps=1, max_retries=1)
    with pytest.warns(UserWarning, match="no step was accepted"):
        records = u.fit([forget], retain)
    assert [r.reason for r in records] == ["trust_region", "trust_region"]
    assert u.status == "nothing_accepted" and same_weights(model, before)


def test_huge_first_step_of_the_search_stays_inside_the_trust_region(loaded, untouched):
    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    u = build_unlearner("newton", model, scale=1e12, steps=1)
    records = u.fit([forget], retain)
    accepted = [r for r in records if r.accepted]
    assert accepted, [r.reason for r in records]
    start = loaded[0]
    # the trust region bounds the tensors with a size (the untrained model's zero biases have none: `zero_tensors`)
    sized = {n for n, q in start.named_parameters() if n in u.param_names and bool(q.ne(0).any())}
    assert sized and sized != set(u.param_names)
    moved = sum(float((p.detach() - q.detach()).double().pow(2).sum())
                for (n, p), (_, q) in zip(model.named_parameters(), start.named_parameters()) if n in sized)
    size = sum(float(q.detach().double().pow(2).sum()) for n, q in start.named_parameters() if n in sized)
    assert math.sqrt(moved / size) <= u.max_step_norm + 1e-9
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_curvature_trust_region_bounds_the_predicted_retain_increase(loaded, untouched):
    """½ΔᵀCΔ of the accepted step stays within predicted_trust × the retain budget, whatever `scale` asks for."""
    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    u = build_unlearner("newton", model, scale=1e6, steps=1, predicted_trust=0.01)
    reference = u.measure(retain[0])
    records = u.fit([forget], retain)
    accepted = [r for r in records if r.accepted]
    assert accepted and accepted[-1].predicted_increase is not None
    assert accepted[-1].predicted_increase <= 0.01 * 0.05 * reference * (1 + 1e-6)


@pytest.mark.parametrize(("setting", "value", "named"), [
    ("scale", float("nan"), "scale"),
    ("scale", -1.0, "scale"),
    ("scale", 0.0, "scale"),
    ("damping", -0.1, "damping"),
    ("damping", float("inf"), "damping"),
    ("max_retain_increase", float("nan"), "max_retain_increase"),
    ("max_step_norm", 0.0, "max_step_norm"),
    ("predicted_trust", -1.0, "predicted_trust"),
    ("steps", 0, "steps"),
    ("stall_ratio", 0.0, "stall_ratio"),
    ("final_budget_share", 1.5, "final_budget_share"),
    ("final_budget_share", 0.0, "final_budget_share"),
])
def test_nonsense_settings_are_refused_at_configuration(loaded, untouched, setting, value, named):
    model = loaded[0]
    with pytest.raises(ValueError, match=named):
        build_unlearner("newton", model, **{setting: value})


def test_a_typo_in_the_method_settings_names_the_key(loaded, untouched):
    with pytest.raises(UserInputError, match="'stepz'.*valid settings:.*steps"):
        build_unlearner("newton", loaded[0], stepz=3)


def test_an_unknown_forget_loss_lists_the_choices(loaded, untouched):
    with pytest.raises(ValueError, match="unknown forget_loss 'hinge'; choose one of"):
        build_unlearner("gradient_ascent", loaded[0], forget_loss="hinge")


def test_nan_in_the_model_weights_names_the_parameter(loaded, untouched):
    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(UserInputError, match=r"not finite .*'transformer\.h\.0\.mlp\.c_fc\.weight'"):
        build_unlearner("newton", model).fit([forget], retain)


def test_a_tokenizer_larger_than_the_embedding_is_named(loaded, untouched):
    """Data tokenised by another (larger) tokenizer: today's failure would be 'index out of range in self'."""
    model, _, forget, retain, _ = loaded
    vocab = model.get_input_embeddings().weight.shape[0]
    big = dict(forget, input_ids=forget["input_ids"].clone())
    big["input_ids"][0, 1] = vocab + 5
    with pytest.raises(UserInputError, match=rf"outside the model's embedding .*{vocab} rows.*tokenizer"):
        build_unlearner("newton", copy.deepcopy(model)).fit([big], retain)


def test_a_zero_row_batch_is_named(loaded, untouched):
    model, _, forget, retain, _ = loaded
    empty = {k: v[:0] for k, v in forget.items()}
    with pytest.raises(UserInputError, match="forget batch 1 is empty"):
        build_unlearner("newton", copy.deepcopy(model)).fit([forget, empty], retain)


def test_labels_that_do_not_align_with_the_inputs_are_named(loaded, untouched):
    model, _, forget, retain, _ = loaded
    bad = dict(retain[0], labels=retain[0]["labels"][:, :-1])
    with pytest.raises(UserInputError, match="retain batch 0: labels have shape"):
        build_unlearner("newton", copy.deepcopy(model)).fit([forget], [bad])


def test_a_batch_that_is_not_a_dict_is_named(loaded, untouched):
    model, _, forget, retain, _ = loaded
    with pytest.raises(UserInputError, match="holdout batch 0 is a Tensor"):
        build_unlearner("newton", copy.deepcopy(model)).fit([forget], retain, holdout_batches=[forget["input_ids"]])


def test_a_typo_in_method_kwargs_fails_through_the_command_before_any_work(engine_project, untouched):
    code, out, err = run_cli(["fit", "--config", str(engine_project.config), "--model.method_kwargs", '{"stepz": 3}'],
                             cwd=engine_project.root)
    assert code != 0 and "'stepz'" in out + err and "valid settings" in out + err
    assert not engine_project.output.exists()



def test_the_newton_optimizer_refuses_a_huge_step_too(loaded, untouched):
    from lightning_unlearn.methods import build_curvature
    from lightning_unlearn.methods.losses import token_nll
    from lightning_unlearn.optim import NewtonUnlearner

    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    curvature = build_curvature("kfac", model).fit(retain)
    opt = NewtonUnlearner(model.parameters(), curvature, lr=1e6, damping=1e-3, max_retries=1)
    before = weights(model)
    opt.zero_grad()
    token_nll(model(**{k: v for k, v in forget.items() if k != "labels"}).logits, forget)[0].mean().backward()
    opt.step()
    assert [r.reason for r in opt.history] == ["trust_region", "trust_region"] and same_weights(model, before)


@pytest.mark.parametrize(("override", "named"), [
    (["--model.scale", ".nan"], "scale must be a finite number > 0"),  # YAML for NaN
    (["--model.scale", "-1"], "scale must be a finite number > 0"),
    (["--model.damping", "-0.5"], "damping must be a finite number > 0"),
    (["--model.forget_loss", "hinge"], "unknown forget_loss 'hinge'"),
])
def test_nonsense_settings_fail_through_the_command_as_one_line(engine_project, untouched, override, named):
    code, out, err = run_cli(["fit", "--config", str(engine_project.config), *override], cwd=engine_project.root)
    assert code == 2 and named in err, (code, err[-2000:])
    assert [line for line in err.splitlines() if "error" in line.lower()] == [err.strip().splitlines()[-1]]
    assert "Traceback" not in err
    assert not engine_project.output.exists()


def _variant(engine_project, name: str, edit) -> Path:
    """A copy of the project's saved model, changed by `edit(state_dict, config) -> (state_dict, config)`."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = engine_project.root / name
    if not folder.exists():
        shutil.copytree(engine_project.model, folder)
        state = load_file(folder / "model.safetensors")
        config = json.loads((folder / "config.json").read_text())
        state, config = edit(state, config)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_nan_weights_in_a_saved_model_fail_through_the_command(engine_project, untouched):
    def poison(state, config):
        key = next(k for k in state if k.endswith("mlp.c_fc.weight"))
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")
        return state, config

    broken = _variant(engine_project, "nan_model", poison)
    before = {p.name: p.read_bytes() for p in broken.iterdir()}
    code, out, err = run_cli(["fit", "--config", str(engine_project.config), "--model.model", str(broken)],
                             cwd=engine_project.root)
    assert code == 2 and "not finite" in err and "c_fc.weight" in err, err[-2000:]
    assert {p.name: p.read_bytes() for p in broken.iterdir()} == before and not engine_project.output.exists()


def test_a_tokenizer_larger_than_the_model_fails_through_the_command(engine_project, untouched):
    def shrink(state, config):
        vocab = 20
        for key in [k for k in state if k.endswith("wte.weight") or k.endswith("lm_head.weight")]:
            state[key] = state[key][:vocab].clone()
        config["vocab_size"] = vocab
        return state, config

    small = _variant(engine_project, "small_vocab_model", shrink)
    code, out, err = run_cli(["fit", "--config", str(engine_project.config), "--model.model", str(small)],
                             cwd=engine_project.root)
    assert code == 2 and "tokenizer has 44 tokens" in err and "only 20 rows" in err, err[-2000:]
    assert not engine_project.output.exists()
