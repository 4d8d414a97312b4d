"""The knowledge regime of the second-order recipe (`docs/recipe.md`: knowledge, not secrets).

A deletion request either removes a *secret* (a canary, a phone number: nothing else in the data touches it) or
*knowledge* the model has memorised beside other knowledge of the same kind (what it knows about one author among
many, TOFU's setting). The two need different recipes, and the request can tell them apart by measuring: when the
retain data the budget is read on is itself memorised (its mean token NLL below `MEMORISED_NATS`, i.e. the model
gives its labels more than 90 % probability per token), the request is about knowledge.

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

#: the held retain loss (mean token NLL, nats) below which the retain data counts as memorised (p > 0.905 per token)
MEMORISED_NATS = 0.1
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
