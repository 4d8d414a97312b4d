"""One request path and one set of defaults for every driver.

(a) The `Unlearn` callback, `UnlearningModule`, `fabric_unlearn` and the command (`fit --print_config`) take every
field of `UnlearnSettings` with its default (the module leaves `steps` to `trainer.max_steps`), and each knob given
to a driver by name reaches the settings it builds. (b) Each driver
reaches `lightning_unlearn.request`: the callback, Fabric and the experiment return its `RequestResult`; the module's
method (also through the command) is the one `prepare_request` built (a spy that wraps the real function). (c) The
same request through the callback, Fabric on one process, the experiment and `serve_request` gives bit-identical
weights and records.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from bad_input_fixtures import make_project, run_cli
from canary_corpus import memorise
from lightning.fabric import Fabric
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

import lightning_unlearn.module as module_file
from lightning_unlearn.callbacks import Unlearn
from lightning_unlearn.errors import UserInputError
from lightning_unlearn.experiment import Experiment
from lightning_unlearn.fabric import fabric_unlearn
from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.module import UnlearningModule
from lightning_unlearn.request import RequestResult, serve_request
from lightning_unlearn.settings import UnlearnSettings

FIELDS = [f.name for f in dataclasses.fields(UnlearnSettings)]
DEFAULTS = UnlearnSettings.defaults()
#: settings a driver does not take, and why
NOT_TAKEN = {"UnlearningModule": {"steps": "Lightning drives the steps: the budget is trainer.max_steps"}}
DICTS = ("method_kwargs", "curvature_kwargs")


def normal(name: str, value: Any) -> Any:
    """A driver's default as a setting: None for a dict field is the empty dict."""
    return {} if name in DICTS and value is None else value


def signature_defaults(fn: Any) -> dict[str, Any]:
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is p.VAR_KEYWORD:
            out[name] = {}  # fabric_unlearn's **method_kwargs
        elif p.default is not p.empty:
            out[name] = p.default
    return out


def check_defaults(driver: str, defaults: dict[str, Any]) -> None:
    skipped = NOT_TAKEN.get(driver, {})
    for name in FIELDS:
        if name in skipped:
            assert name not in defaults, f"{driver} takes {name!r} after all: remove it from NOT_TAKEN"
            continue
        assert name in defaults, f"{driver} does not take the setting {name!r}"
        assert normal(name, defaults[name]) == DEFAULTS[name], (driver, name, defaults[name], DEFAULTS[name])


# ---------------------------------------------------------------------------------------------- (a) defaults
@pytest.mark.parametrize(("driver", "fn"), [("Unlearn", Unlearn.__init__), ("UnlearningModule",
                                                                           UnlearningModule.__init__),
                                            ("fabric_unlearn", fabric_unlearn)])
def test_every_driver_takes_every_setting_with_the_dataclass_default(driver, fn):
    check_defaults(driver, signature_defaults(fn))


#: a value other than the default for every setting (a new field must be added here: the test below checks)
CHANGED = {"method": "fisher_removal", "curvature": "diagonal", "curvature_data": "forget", "curvature_batches": 3,
           "holdout_batches": 2, "damping": 0.5, "scale": 0.25, "steps": 3, "forget_loss": "nll",
           "max_retain_increase": 0.1, "forget_target": 2.0, "fisher_type": "empirical",
           "full_curvature": "c.safetensors", "refresh_every": 2, "knowledge": False,
           "method_kwargs": {"protect_groups": 2},
           "curvature_kwargs": {"include": ["h.0.mlp"]}}


@pytest.mark.parametrize("name", FIELDS)
def test_every_driver_passes_every_setting_into_its_settings(name, monkeypatch):
    """Each knob given to a driver by name reaches its `UnlearnSettings`, alone and over `settings=`."""
    assert set(CHANGED) == set(FIELDS), "give the new setting a changed value in CHANGED"
    import lightning_unlearn.fabric as fabric_file

    expected = UnlearnSettings(**{name: CHANGED[name]})
    base = UnlearnSettings(max_retain_increase=0.2) if name != "max_retain_increase" else UnlearnSettings(steps=2)
    assert Unlearn(**{name: CHANGED[name]}).settings == expected
    assert Unlearn(settings=base, **{name: CHANGED[name]}).settings == base.replace(**{name: CHANGED[name]})
    if name not in NOT_TAKEN["UnlearningModule"]:
        assert UnlearningModule(small_causal_lm("gpt2", seed=0), **{name: CHANGED[name]}).settings == expected
    spy = Spy(fabric_file.serve_request)
    monkeypatch.setattr(fabric_file, "serve_request", spy)
    with pytest.raises(UserInputError):  # no forget batch: refused after the settings were built
        fabric_unlearn(Fabric(accelerator="cpu", devices=1), small_causal_lm("gpt2", seed=0), [],
                       **{name: CHANGED[name]})
    assert spy.calls[0]["settings"] == expected


def test_the_module_refuses_steps_and_fabric_takes_further_method_keywords():
    with pytest.raises(UserInputError, match="the trainer's max_steps caps the steps"):
        UnlearningModule(small_causal_lm("gpt2", seed=0), steps=3)
    with pytest.raises(UserInputError, match="unknown setting 'stepz'"):
        Unlearn(stepz=3)
    with pytest.raises(UserInputError, match="'stepz'.*valid settings"):  # fabric: a method keyword, checked too
        fabric_unlearn(Fabric(accelerator="cpu", devices=1), small_causal_lm("gpt2", seed=0), [], stepz=3)


def test_the_command_prints_the_dataclass_defaults(tmp_path):
    code, out, err = run_cli(["fit", "--print_config"], tmp_path)
    assert code == 0, err[-2000:]
    check_defaults("UnlearningModule", yaml.safe_load(out)["model"])


def test_drivers_built_with_no_knob_hold_the_default_settings():
    assert Unlearn().settings == UnlearnSettings()
    assert UnlearningModule(small_causal_lm("gpt2", seed=0)).settings == UnlearnSettings()
    from lightning_unlearn.demo import DEFAULT_SETTINGS  # the demo: the defaults with 8 curvature batches

    assert DEFAULT_SETTINGS.replace(curvature_batches=UnlearnSettings.curvature_batches) == UnlearnSettings()


@pytest.mark.parametrize(("changes", "named"), [
    ({"method": "wipe"}, "unknown unlearning method 'wipe'"),
    ({"curvature": "lbfgs"}, "unknown curvature backend 'lbfgs'"),
    ({"curvature_data": "all"}, "curvature_data must be one of"),
    ({"curvature_batches": 0}, "curvature_batches must be a whole number >= 1"),
    ({"holdout_batches": -1}, "holdout_batches must be a whole number >= 0"),
    ({"steps": 0}, "steps must be a whole number >= 1"),
    ({"scale": float("nan")}, "scale must be a finite number > 0"),
    ({"method_kwargs": {"stepz": 3}}, "'stepz'.*valid settings"),
    ({"method_kwargs": {"curvature_kwargs": {}}}, "'curvature_kwargs' is not a method setting here"),
    ({"curvature": "cg", "fisher_type": "mc"}, "curvature 'cg': unknown setting 'fisher_type'"),
])
def test_settings_refuse_nonsense_at_construction_in_every_driver(changes, named):
    with pytest.raises(UserInputError, match=named):
        UnlearnSettings(**changes)
    with pytest.raises(UserInputError, match=named):
        Unlearn(**changes)
    if not set(changes) & set(NOT_TAKEN["UnlearningModule"]):
        with pytest.raises(UserInputError, match=named):  # before the model is loaded
            UnlearningModule("no/model/needed/the/settings/fail/first", **changes)


# ---------------------------------------------------------------------------------------------- (b) + (c) one path
class Spy:
    """Wraps a real function: records each call's keyword arguments and result, and calls through."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls, self.results = fn, [], []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        self.results.append(self.fn(*args, **kwargs))
        return self.results[-1]


class CanaryExperiment(Experiment):
    """The experiment's request on the canary corpus of the tests (the data side replaced, as `QAExperiment` does)."""

    def __init__(self, data: tuple[Any, ...], output: Path) -> None:
        super().__init__(output=output, progress=False)
        self.forget, self.retain, self.held, self.holdout = data

    def forget_batches(self):
        return [self.forget]

    def retain_batches(self, n):
        return self.retain[:n]

    def held_retain_batch(self):
        return self.held

    def holdout_batches(self):
        return [self.holdout]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_request_through_every_driver_gives_bit_identical_weights(tmp_path):
    model, forget, retain, held, holdout = memorise("gpt2")  # 4 memorised digit canaries, 8 unseen ones
    start = weights(model)

    def fresh() -> torch.nn.Module:
        model.load_state_dict(start)
        return model

    results: dict[str, tuple[dict[str, torch.Tensor], list[dict]]] = {}

    direct = serve_request(fresh(), [forget], retain, [holdout], settings=UnlearnSettings(), held_retain=held)
    results["serve_request"] = weights(model), [r.to_dict() for r in direct]

    callback = Unlearn(forget=[forget], retain=retain, held_retain=held, holdout=[holdout])  # no knob set
    through_callback = callback.unlearn(fresh())
    assert isinstance(through_callback, RequestResult) and callback.last_result is through_callback
    assert callback.last_summary == through_callback.summary and callback.history == list(through_callback)
    results["Unlearn"] = weights(model), [r.to_dict() for r in through_callback]

    through_fabric = fabric_unlearn(Fabric(accelerator="cpu", devices=1), fresh(), [forget], retain,
                                    held_retain_batch=held, holdout=[holdout])
    assert isinstance(through_fabric, RequestResult) and through_fabric.unlearner is not None
    results["fabric_unlearn"] = weights(model), [r.to_dict() for r in through_fabric]

    experiment = CanaryExperiment((forget, retain, held, holdout), tmp_path)
    unlearned, records, _ = experiment.unlearn(fresh(), UnlearnSettings())  # the experiment unlearns a copy
    assert isinstance(experiment.last_result, RequestResult) and experiment.last_summary == direct.summary
    results["Experiment"] = weights(unlearned), [r.to_dict() for r in records]

    assert direct.status == "target_reached" and direct.summary["steps_accepted"] >= 1, direct.summary
    from lightning_unlearn.methods.records import SUMMARY_FIELDS  # the one summary schema (the module's too)

    assert tuple(direct.summary) == SUMMARY_FIELDS
    reference_weights, reference_records = results["serve_request"]
    assert any(not torch.equal(reference_weights[k], v) for k, v in start.items()), "the request changed nothing"
    for driver, (got_weights, got_records) in results.items():
        assert got_records == reference_records, driver
        for name, value in reference_weights.items():
            assert torch.equal(got_weights[name], value), (driver, name)


def random_batches(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 127, (n, 16), generator=g)
    return DataLoader([{"input_ids": r, "attention_mask": torch.ones(16, dtype=torch.long), "labels": r.clone()}
                       for r in ids], batch_size=4)


def test_the_module_builds_its_method_with_prepare_request(tmp_path, monkeypatch):
    spy = Spy(module_file.prepare_request)
    monkeypatch.setattr(module_file, "prepare_request", spy)
    forget, retain = random_batches(4, 1), random_batches(8, 2)
    module = UnlearningModule(small_causal_lm("gpt2", seed=0), curvature="diagonal", curvature_batches=1)
    module.set_curvature_data(retain)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, CombinedLoader({"forget": forget, "retain": retain}))
    assert len(spy.calls) == 1 and module.unlearner is spy.results[0]
    # a second-order request takes the API's steps (steps=None), capped by Lightning's max_steps after `begin`
    assert spy.calls[0]["settings"] is module.settings and spy.calls[0]["steps"] is None
    assert module.unlearner.steps == 1 and module.unlearner.final_repeats == 0
    assert len(spy.calls[0]["curvature_source"]) == 1 and module.history


def test_the_command_reaches_prepare_request_through_the_module(tmp_path, monkeypatch):
    spy = Spy(module_file.prepare_request)
    monkeypatch.setattr(module_file, "prepare_request", spy)
    project = make_project(tmp_path / "user")
    code, out, err = run_cli(["fit", "--config", str(project.config)], project.root)
    assert code == 0, err[-3000:]
    assert len(spy.calls) == 1
    settings = spy.calls[0]["settings"]  # the config's model: section, the rest the dataclass defaults
    assert settings == UnlearnSettings(curvature_batches=2)
