"""Benchmark presets: the experiment (models and data), the method sweep, and the scaling grid.

- `smoke`: tiny sizes, a few tens of seconds; run by `tests/test_benchmarks.py` so the benchmark cannot rot.
- `cpu-small` (default): the demo's default experiment (a 1M-parameter GPT-2 with canaries); at most ~30 minutes on
  2 CPU cores including training both models (cached under `--cache` afterwards).
- `cpu-full`: the same experiment with the full sweep of every method's knob (about an hour).
- `gpu`: GPT-2-small shapes (768 wide, 12 blocks, 12 heads); documented, not run on the CPU machine (see
  benchmarks/README.md for what it needs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_unlearn.experiment import ExperimentConfig
from lightning_unlearn.methods import second_order_methods
from lightning_unlearn.qa_experiment import QAConfig
from lightning_unlearn.settings import UnlearnSettings

#: the methods that use curvature (the method registry's list)
SECOND_ORDER = second_order_methods()


@dataclass
class Run:
    """One row of the sweep: a label (`newton_kfac`, `gradient_ascent`, ...) and the method's settings.

    `target`: stop iterative runs on the cheap signal "forget-span NLL >= the retrained model's" (`forget_target`
    set at run time from the retrained model).
    """

    label: str
    settings: UnlearnSettings
    target: bool = False


@dataclass
class Preset:
    name: str
    experiment: ExperimentConfig
    runs: list[Run]
    #: model sizes (hidden, layers) of the random-init GPT-2 models of the width/depth scaling
    scaling_sizes: list[tuple[int, int]]
    #: forget-set sizes (sequences) of the forget-set scaling (curvature fitted on the forget set)
    scaling_forget: list[int]
    #: (hidden, layers) of the model of the forget-set scaling
    scaling_forget_model: tuple[int, int]
    scaling_batches: int = 4
    scaling_batch_size: int = 8
    scaling_seq_len: int = 64
    scaling_vocab: int = 512
    #: epochs of brief training (over the largest forget set) of the models of the default request's scaling
    scaling_train_epochs: int = 60
    #: width of the one-block GPT-2-small-shaped model whose K-FAC footprint is accumulated for real
    gpt2_measure_hidden: int = 768
    #: within this many bits of the retrained model's inserted-canary exposure = "forgotten"
    level_bits: float = 1.0
    description: str = ""
    extra: dict = field(default_factory=dict)
    #: the frontier benchmark (canaries + QA over `seeds`, every method's curve) instead of the single-seed sweep
    frontier: bool = False
    seeds: tuple[int, ...] = (0,)
    qa: QAConfig = field(default_factory=QAConfig)


def _newton(curv: str, damping: float, scale: float = 1.0, steps: int = 1, batches: int = 8,
            loss: str = "unlikelihood", method: str = "newton", **extra) -> UnlearnSettings:
    curvature_kwargs = extra.pop("curvature_kwargs", {})
    return UnlearnSettings(method=method, curvature=curv, curvature_data="retain", curvature_batches=batches,
                           damping=damping, scale=scale, steps=steps, forget_loss=loss, method_kwargs=extra,
                           curvature_kwargs=curvature_kwargs)


def _first(method: str, lr: float, steps: int, loss: str = "unlikelihood", **extra) -> UnlearnSettings:
    # damping is the learning-rate divisor of first-order methods (1 = the given lr); no curvature
    return UnlearnSettings(method=method, curvature_batches=1, damping=1.0, scale=1.0, steps=steps,
                           forget_loss=loss, method_kwargs={"lr": lr, **extra})


def _cg(**kw) -> dict:
    return {"curvature_kwargs": {"max_iter": kw.pop("max_iter", 10)}, **kw}


def full_runs(first_order_steps: int = 100, cg_batches: int = 2, wf_batches: int = 4) -> list[Run]:
    """The sweep of cpu-small (and gpu): each method's main knob, around the demo-tuned settings."""
    runs = [
        # K-FAC Newton: damping (1 is rolled back to 10 by the LM safety), step scale, one iterative variant
        Run("newton_kfac", _newton("kfac", 10.0)),
        Run("newton_kfac", _newton("kfac", 1.0)),
        Run("newton_kfac", _newton("kfac", 100.0)),
        Run("newton_kfac", _newton("kfac", 10.0, scale=2.0)),
        Run("newton_kfac", _newton("kfac", 10.0, steps=5), target=True),
        # Hessian-free CG: 10 iterations on 2 curvature batches (each iteration is a GGN-vector product per batch)
        Run("newton_cg", _newton("cg", 10.0, batches=cg_batches, **_cg())),
        Run("newton_cg", _newton("cg", 100.0, batches=cg_batches, **_cg())),
        # Woodbury empirical Fisher with the project's forget objective
        Run("newton_woodfisher", _newton("woodfisher", 1.0, batches=wf_batches)),
        Run("newton_woodfisher", _newton("woodfisher", 10.0, batches=wf_batches)),
        # diagonal Fisher: its entries are small (squared gradients), so its damping lives lower
        Run("newton_diagonal", _newton("diagonal", 0.01)),
        Run("newton_diagonal", _newton("diagonal", 0.1)),
        Run("newton_diagonal", _newton("diagonal", 1.0)),
        # the seed paper's methods: Fisher Removal (NLL objective), Fisher Forgetting (+ curvature-shaped noise)
        Run("fisher_removal", _newton("woodfisher", 1.0, batches=wf_batches, loss="nll", method="fisher_removal")),
        Run("fisher_removal", _newton("woodfisher", 10.0, batches=wf_batches, loss="nll", method="fisher_removal")),
        Run("fisher_forgetting", _newton("woodfisher", 10.0, batches=wf_batches, method="fisher_forgetting",
                                         mu=1e-12)),
        Run("fisher_forgetting", _newton("woodfisher", 10.0, batches=wf_batches, method="fisher_forgetting",
                                         mu=1e-8)),
    ]
    n = first_order_steps
    for lr in (1e-4, 3e-4, 1e-3):
        runs.append(Run("gradient_ascent", _first("gradient_ascent", lr, n), target=True))
    runs.append(Run("gradient_ascent", _first("gradient_ascent", 3e-4, n, loss="nll"), target=True))
    for lr in (3e-4, 1e-3):
        runs.append(Run("gradient_difference", _first("gradient_difference", lr, n), target=True))
    for lr in (3e-4, 1e-3):
        runs.append(Run("npo", _first("npo", lr, n), target=True))
    return runs


def core_runs(first_order_steps: int = 30) -> list[Run]:
    """The reduced sweep of cpu-small (fits 30 minutes on 2 shared cores): the demo recipe and its damping and
    iteration knobs for K-FAC, one setting per other curvature method, two learning rates of gradient ascent."""
    n = first_order_steps
    return [
        Run("newton_kfac", _newton("kfac", 10.0)),
        Run("newton_kfac", _newton("kfac", 1.0)),
        Run("newton_kfac", _newton("kfac", 10.0, steps=5), target=True),
        Run("newton_cg", _newton("cg", 10.0, batches=2, **_cg())),
        Run("newton_woodfisher", _newton("woodfisher", 10.0, batches=4)),
        Run("newton_diagonal", _newton("diagonal", 0.01)),
        Run("fisher_removal", _newton("woodfisher", 10.0, batches=4, loss="nll", method="fisher_removal")),
        Run("fisher_forgetting", _newton("woodfisher", 10.0, batches=4, method="fisher_forgetting", mu=1e-12)),
        Run("gradient_ascent", _first("gradient_ascent", 1e-4, n), target=True),
        Run("gradient_ascent", _first("gradient_ascent", 1e-3, n), target=True),
        Run("gradient_difference", _first("gradient_difference", 1e-3, n), target=True),
        Run("npo", _first("npo", 1e-3, n), target=True),
    ]


def smoke_runs() -> list[Run]:
    """One setting per method (two for K-FAC and gradient ascent), small budgets."""
    return [
        Run("newton_kfac", _newton("kfac", 10.0, batches=2)),
        Run("newton_kfac", _newton("kfac", 10.0, steps=2, batches=2), target=True),
        Run("newton_cg", _newton("cg", 10.0, batches=1, **_cg(max_iter=3))),
        Run("newton_woodfisher", _newton("woodfisher", 10.0, batches=1)),
        Run("newton_diagonal", _newton("diagonal", 0.1, batches=2)),
        Run("fisher_removal", _newton("woodfisher", 10.0, batches=1, loss="nll", method="fisher_removal")),
        Run("fisher_forgetting", _newton("woodfisher", 10.0, batches=1, method="fisher_forgetting", mu=1e-12)),
        Run("gradient_ascent", _first("gradient_ascent", 1e-3, 5), target=True),
        Run("gradient_difference", _first("gradient_difference", 1e-3, 3), target=True),
        Run("npo", _first("npo", 1e-3, 3), target=True),
    ]


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        experiment=ExperimentConfig(corpus_bytes=40_000, canaries_per_group=2, repetitions=(2, 8), n_references=6,
                                    secret_length=3, vocab_size=300, max_length=64, hidden=32, layers=1, heads=2,
                                    batch_size=8, train_steps=40, warmup_steps=5),
        runs=smoke_runs(),
        scaling_sizes=[(16, 1), (32, 1), (32, 2), (48, 2)],
        scaling_forget=[4, 8, 16],
        scaling_forget_model=(32, 1),
        scaling_batches=2, scaling_batch_size=4, scaling_seq_len=32, scaling_vocab=128, scaling_train_epochs=10,
        gpt2_measure_hidden=96,
        description="tiny sizes for CI (a few tens of seconds); numbers are meaningless, only the pipeline is tested",
        frontier=True,
        qa=QAConfig(n_people=30, facts_per_person=3, background_bytes=20_000, test_bytes=5_000, vocab_size=300,
                    max_length=64, hidden=32, layers=1, heads=2, batch_size=8, train_steps=40, warmup_steps=5,
                    eval_retain_examples=32),
    ),
    "cpu-small": Preset(
        name="cpu-small",
        experiment=ExperimentConfig(),
        runs=core_runs(),
        scaling_sizes=[(64, 2), (128, 2), (128, 4), (256, 4)],
        scaling_forget=[8, 16, 32],
        scaling_forget_model=(128, 4),
        scaling_batches=2,
        gpt2_measure_hidden=384,
        description="the frontier benchmark: the demo's canary experiment (GPT-2 shape, 128 wide, 4 blocks, ~1M "
                    "parameters) and the TOFU-style QA experiment, 3 seeds each, every method's knob swept, on 2 CPU "
                    "cores",
        frontier=True,
        seeds=(0, 1, 2),
    ),
    "cpu-full": Preset(
        name="cpu-full",
        experiment=ExperimentConfig(),
        runs=full_runs(),
        scaling_sizes=[(64, 2), (128, 2), (128, 4), (256, 4)],
        scaling_forget=[8, 32, 128],
        scaling_forget_model=(128, 4),
        description="cpu-small with the full sweep (2-5 settings per method, 100-step first-order budgets); "
                    "about an hour on 2 quiet cores once the models are cached",
    ),
    "gpu": Preset(
        name="gpu",
        experiment=ExperimentConfig(corpus_bytes=20_000_000, canaries_per_group=16, repetitions=(5, 10, 20),
                                    n_references=200, secret_length=6, vocab_size=8192, max_length=512,
                                    hidden=768, layers=12, heads=12, batch_size=32, train_steps=20_000, lr=6e-4,
                                    warmup_steps=500),
        runs=full_runs(first_order_steps=200, cg_batches=4, wf_batches=2),
        scaling_sizes=[(256, 4), (512, 8), (768, 12), (1024, 24)],
        scaling_forget=[32, 128, 512],
        scaling_forget_model=(768, 12),
        scaling_batches=8, scaling_batch_size=8, scaling_seq_len=512, scaling_vocab=8192,
        description="GPT-2-small shapes (768 wide, 12 blocks, 12 heads, 8k vocabulary); not run on the CPU machine",
    ),
}
