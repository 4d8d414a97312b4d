"""The knowledge regime of the second-order recipe (`docs/recipe.md`: knowledge, not secrets).

A deletion request either removes a *secret* (a canary, a phone number: nothing else in the data touches it) or
*knowledge* the model has memorised beside other knowledge of the same kind (what it knows about one author among
many, TOFU's setting). The two need different recipes, and the request can tell them apart by measuring. It is
about knowledge when
- the retain data the budget is read on is itself memorised: its mean token NLL below `MEMORISED_NATS` (the model
  gives its labels more than 90 % probability per token);
- or the budget is read on data the model was not trained on (held-out prose) while the retain data holds memorised
  knowledge of the forget set's kind: the forget set is memorised knowledge (its mean token NLL at most
  `MEMORISED_SHARE_OF_HOLDOUT` of the holdout's, never-seen data of its kind) and at least `KNOWLEDGE_RETAIN_SHARE` of
  the first retain batch's examples are memorised (mean token NLL at most `RETAIN_MEMORISED_OF_HELD` of the held
  batch's). Both comparisons are within one kind of data labelled one way (forget against holdout, retain against
  held), so canaries labelled on their secret beside prose do not trigger it. Here the budget stays the caller's
  (5 %): it is read on data that is not memorised, where a relative rise is not noise. Measured in
  `docs/recipe.md` §9 (`benchmarks/lines_knowledge.py`).

On memorised retain data three things of the secret recipe fail, measured on the TOFU-faithful benchmark
(`benchmarks/tofu.py`, 3 seeds):
- the budget `log 1.05` = 0.049 nats of held retain loss is spent by the first step: every run reaching forget
  quality ≥ 0.05 on forget10 moved the held retain loss by 0.2 nats or more, as every first-order baseline did;
- the unlikelihood objective pushes the most confident tokens, which on a memorised answer are all of them,
  templates included (the truth ratios then differ from a retrained model's), where the NLL objective spreads the
  rise over the answer;
- the retain curvature cannot protect memorised answers (on a memorised answer the output Hessian
  `diag(p) − p pᵀ → 0`), but their gradients still point where an answer's margin shrinks: protecting groups of
  the step's retain examples to first order (`protect_retain`) halves the retain damage at a given target.

So in the knowledge regime the recipe uses the NLL objective, `protect_retain=KNOWLEDGE_PROTECT_RETAIN` groups, a
budget of at least `KNOWLEDGE_RETAIN_INCREASE` (the held retain answers' per-token probability may fall by up to
23 %) and `KNOWLEDGE_STEPS` smaller stages, unless the caller set them; `knowledge=False` keeps the secret recipe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .losses import DEFAULT_FORGET_LOSS
from .records import Batch, StepRecord, as_batches

#: the held retain loss (mean token NLL, nats) below which the retain data counts as memorised (p > 0.905 per token)
MEMORISED_NATS = 0.1
#: the forget set is memorised knowledge when its mean token NLL is at most this share of the holdout's (lines about
#: people: 0.05-0.09; TOFU-style answers: 0.001; canaries labelled on their secret: 0.01-0.02 in the tests' tiny models)
MEMORISED_SHARE_OF_HOLDOUT = 0.15
#: a retain example is memorised when its mean token NLL is at most this share of the held retain batch's (the lines'
#: retain batches: 33-90 % of their examples; the tests' tiny canary models, which overfit their prose: 0-3 %)
RETAIN_MEMORISED_OF_HELD = 0.15
#: the share of the first retain batch's examples that, memorised beside a memorised forget set, makes it knowledge
KNOWLEDGE_RETAIN_SHARE = 0.25
#: the retain budget of the knowledge regime (relative; `target.retain_budget_nats`: log 1.3 = 0.26 nats)
KNOWLEDGE_RETAIN_INCREASE = 0.3
#: groups of the step's retain examples protected to first order in the knowledge regime
KNOWLEDGE_PROTECT_RETAIN = 8
#: the forget objective of the knowledge regime
KNOWLEDGE_FORGET_LOSS = "nll"
#: the staged steps of the knowledge regime (the secret recipe: 5). Each step protects the next retain batch's
#: groups and moves a smaller stage: on TOFU forget10 (seed 0) 10 steps reached the target at a held retain loss of
#: 0.24 nats where 5 steps spent the 0.26-nat budget at a forget score of 0.12
KNOWLEDGE_STEPS = 10


def is_memorised(reference_loss: float | None) -> bool:
    """Whether retain data with mean token NLL `reference_loss` counts as memorised (`MEMORISED_NATS`)."""
    return reference_loss is not None and reference_loss < MEMORISED_NATS


def knowledge_budget(max_retain_increase: float | None) -> float | None:
    """The knowledge regime's retain budget: at least `KNOWLEDGE_RETAIN_INCREASE`; None (no check) stays None."""
    return None if max_retain_increase is None else max(float(max_retain_increase), KNOWLEDGE_RETAIN_INCREASE)


class KnowledgeRegime:
    """The regime's part of `SecondOrderUnlearner` (a mixin before `Unlearner`): which settings the run uses, chosen
    in `begin` from the held retain loss, and the staged budget (`budget_fraction`, `should_stop`). The host sets
    `secret_steps` (the secret recipe's number of steps) and `staged`, and calls `init_regime` in its constructor."""

    secret_steps: int
    staged: bool

    def init_regime(self, knowledge: bool | None, **given: Any) -> None:
        """Check `knowledge` and keep what the caller set (`given`: forget_loss, protect_retain,
        max_retain_increase, steps, staged_budget; None: not set), restored at the start of every run."""
        protect = given.get("protect_retain")
        if protect is not None and int(protect) < 0:
            raise ValueError(f"protect_retain must be >= 0 (groups of the step's retain examples; 0: none), got "
                             f"{protect}")
        if knowledge is not None and not isinstance(knowledge, bool):
            raise ValueError(f"knowledge must be None (decided from the held retain loss), True or False, got "
                             f"{knowledge!r}")
        self.knowledge = knowledge
        self._given = dict(given)
        self.use_regime(bool(knowledge))

    @property
    def caller_retain_increase(self) -> float | None:
        """The retain budget the caller set (`max_retain_increase`; None: no check), which the regime may relax for
        its staged steps: what the retain repair aims back at (`methods.repair`)."""
        return self._given["max_retain_increase"]

    def use_regime(self, knowledge: bool, relax_budget: bool | None = None) -> None:
        """Set the knowledge regime on or off: the objective, the retain protection, the budget, the number of steps
        and the staged budget the caller did not set take the regime's values. `relax_budget` (default: `knowledge`):
        whether the budget and its staging are the regime's too (only where the budget is read on memorised data)."""
        given = self._given
        self.knowledge_regime = bool(knowledge)
        relax = bool(knowledge) and relax_budget is not False
        self.forget_loss = given["forget_loss"] or (KNOWLEDGE_FORGET_LOSS if knowledge else DEFAULT_FORGET_LOSS)
        protect = given["protect_retain"]
        self.protect_retain = int(protect) if protect is not None else (KNOWLEDGE_PROTECT_RETAIN if knowledge else 0)
        budget = self.caller_retain_increase
        self.max_retain_increase = knowledge_budget(budget) if relax else budget
        steps = given["steps"]
        self.steps = int(steps) if steps is not None else (KNOWLEDGE_STEPS if knowledge else self.secret_steps)
        staged_budget = given["staged_budget"]
        self.staged_budget = bool(staged_budget) if staged_budget is not None else relax

    def begin(self, forget: Sequence[Batch], retain: Sequence[Batch] = (),
              held_retain_batch: Batch | None = None) -> bool:
        """The host's `begin`, then the regime: with `knowledge=None` the knowledge regime when the retain data the
        budget is read on is memorised, or when that data is not but the retain data holds memorised knowledge of the
        forget set's kind (see the module docstring); never on a retain-free request, whose budget is read on the
        holdout. The regime's budget only in the first case."""
        self.use_regime(bool(self.knowledge))
        done = super().begin(forget, retain, held_retain_batch)  # type: ignore[misc]
        if self.knowledge is None:
            host: Any = self
            retain = as_batches(retain)
            held = host.budget_batches(held_retain_batch, retain)
            held_loss = host._losses.get("retain_before")
            on_retain = held is not None and held is not host.holdout and held_loss is not None
            held_memorised = on_retain and is_memorised(held_loss)
            retain_memorised = (on_retain and not held_memorised and bool(retain) and math.isfinite(held_loss)
                                and self.forget_is_knowledge()
                                and self.memorised_share(retain[0], RETAIN_MEMORISED_OF_HELD * held_loss)
                                >= KNOWLEDGE_RETAIN_SHARE)
            self.use_regime(held_memorised or retain_memorised, relax_budget=held_memorised)
        return done

    def forget_is_knowledge(self) -> bool:
        """Whether the forget set's mean token NLL is at most `MEMORISED_SHARE_OF_HOLDOUT` of the holdout's (both
        measured before the run); False without a holdout."""
        host: Any = self
        forget, holdout = host._losses.get("forget_before"), host.holdout_loss
        if forget is None or holdout is None or not (math.isfinite(forget) and math.isfinite(holdout)):
            return False
        return forget <= MEMORISED_SHARE_OF_HOLDOUT * holdout

    def memorised_share(self, batch: Batch, level: float) -> float:
        """The share of `batch`'s examples (over every process) whose mean token NLL is at most `level`."""
        host: Any = self
        losses, _, _ = host.example_losses(batch)
        counts = host.reduce(torch.tensor([float((losses <= level).sum()), float(losses.numel())],
                                          dtype=torch.float64))
        return float(counts[0]) / float(counts[1]) if float(counts[1]) > 0 else 0.0

    def budget_fraction(self) -> float:
        """The share of the retain budget the current step may have spent by its end: with `staged_budget` (and
        staging), k/K at step k of K, so that a step that cannot reach its stage does not spend the whole budget
        and leave nothing to the steps after it (each protecting other retain examples); else 1."""
        if not (self.staged_budget and self.staged):
            return 1.0
        done = self.step_count - self._stage_origin  # type: ignore[attr-defined]
        return min(1.0, max(done, 1) / self.steps)

    def should_stop(self, record: StepRecord) -> bool:
        """The host's rule, except that a step that spent its stage's share of a staged budget (not the whole budget)
        does not end the run."""
        if record.accepted and record.reason == "retain_budget" and self.budget_fraction() < 1.0:
            return self.run_path_spent()  # type: ignore[attr-defined]
        return super().should_stop(record)  # type: ignore[misc]
