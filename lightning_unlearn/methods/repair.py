"""The retain repair (`docs/recipe.md` §10): after the staged steps, Newton steps that *descend* the retain loss
while leaving the forget set's losses where the steps put them, to first order.

Why: on memorised retain data (the knowledge regime) the staged steps reach their target with the retain answers
damaged (TOFU-style forget10: greedy retain answers' ROUGE-L 0.99 → 0.70-0.85, model utility 0.30 → 0.25-0.30), and
that damage is shallow: a few retain-descent steps mend most of it. Plain retain descent also gives back some of the
forgetting (forget quality 0.47 → 0.08-0.37 in 3-10 Adam steps); constrained to leave 8 groups of forget examples'
losses in place, it does not.

The step: `d = (C + λI)⁻¹(−∇L_retain)` over up to `REPAIR_BATCHES` of the run's retain batches, constrained with the
gradients of `protect_groups` groups of forget examples (`SecondOrderUnlearner.protected_direction`). Its length is
searched on the held retain batch: from `‖Δθ‖ = REPAIR_START · ‖θ‖`, doubled while the held retain loss falls, the
forget score stays at least where it was (or at the target, if lower; less `REPAIR_SCORE_SLACK`, so a run can end up
to 0.001 below the target it reached), at most where it was or `REPAIR_SCORE_BAND` null standard deviations above the
target, whichever is higher (`repair_score_ceiling`), and everything is finite; halved (up to
`REPAIR_HALVINGS` times) while the first length does not lower the held loss. The lowest held loss wins; a repair that
finds none leaves the weights as they were. On memorised data the curvature is nearly flat, so `η = 1` (the
quadratic model's minimum) is far too long; the search needs the measurement.

Rounds: the knowledge regime relaxes the caller's budget for the staged steps (`knowledge.knowledge_budget`), and
one repair step does not always bring the held retain loss back within the caller's own: up to `REPAIR_ROUNDS`
steps, each with a fresh gradient and direction from where the last left the weights, until it is (or a round keeps
nothing). Each round's floor is read where it starts; the ceiling is the first round's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .inputs import all_finite
from .records import Batch, as_batches
from .target import null_score_sd, over_retain_budget
from .trust_region import largest_trusted_step

#: retain batches whose gradient the repair descends (4 and all 15 of a TOFU-style request gave the same utility)
REPAIR_BATCHES = 4
#: the first trial length, as ‖Δθ‖ / ‖θ‖
REPAIR_START = 0.01
#: trial lengths at most (doubling from the start, after any halvings)
REPAIR_POINTS = 8
#: halvings of the first length when it does not lower the held retain loss
REPAIR_HALVINGS = 3
#: repair rounds at most. One round left the held retain loss of a tiny Qwen2's TOFU-style forget10 at 0.20-0.17
#: nats from 0.02-0.03 at the start (greedy retain answers' ROUGE-L 0.81); four brought it to 0.09-0.10 (0.89-0.97).
#: Rounds stop once the loss is back within the caller's budget, so where one round does that nothing changes.
REPAIR_ROUNDS = 4
#: how far below its floor (the forget score before the repair, or the target if lower) a repair trial may leave the
#: score. The repair holds the forget losses to first order only, and a run whose last step landed on its target (the
#: step search takes the smallest η that reaches it) kept or dropped the repair on the sign of second-order terms:
#: on a tiny Llama's facts the held retain loss 0.247 → 0.146 came with the score 0.5000 → 0.4989, and 3 halvings
#: left 0.499997, so the repair was dropped by 3e-6 of score. 1e-3 is a thousandth of the AUC's range.
REPAIR_SCORE_SLACK = 1e-3
#: how far above the target a repair trial may take the forget score, in standard deviations of the score of a forget
#: set and a holdout that are alike (`target.null_score_sd`): 2 is the two-sided 5 % level of the attack the target
#: is. The repair descends the retain loss, and where the holdout is of the retain data's kind its losses fall with
#: it, so the score rises: on a tiny StableLM's memorised lines the repair took it 0.50 → 0.83 (8 forget lines, 32
#: holdout lines), which tells the forget set from the holdout as surely as 0.17 would.
REPAIR_SCORE_BAND = 2.0


class RetainRepair:
    """Mixin of `SecondOrderUnlearner`: `retain_repair` (None: on exactly in the knowledge regime) and `repair`,
    which `finish` runs before it measures the losses after."""

    retain_repair: bool | None
    _repair_loss: float | None

    def init_repair(self, retain_repair: bool | None) -> None:
        self.retain_repair = None if retain_repair is None else bool(retain_repair)
        self._repair_loss = None  # the held retain loss the repair started from (None: no repair ran)
        self.repair_rounds = 0  # the rounds the last repair kept

    def finish(self, forget: Sequence[Batch], retain: Sequence[Batch] = (),
               held_retain_batch: Batch | None = None) -> str:
        """The retain repair, then the host's end of the run (the losses after are measured after the repair)."""
        host: Any = self
        if host.run_records:
            forget, retain = as_batches(forget), as_batches(retain)
            self.repair(forget, retain, host.budget_batches(held_retain_batch, retain))
        return super().finish(forget, retain, held_retain_batch)  # type: ignore[misc]

    def summary(self) -> dict[str, Any]:
        """The host's summary with `retain_loss_before_repair`: the held retain loss the repair started from (None
        when no repair step was kept), and `repair_rounds`: the repair steps kept."""
        out = super().summary()  # type: ignore[misc]
        out["retain_loss_before_repair"] = self._repair_loss
        out["repair_rounds"] = self.repair_rounds
        return out

    @property
    def repairs(self) -> bool:
        """Whether this run ends with the retain repair: `retain_repair`, or by default in the knowledge regime."""
        if self.retain_repair is not None:
            return self.retain_repair
        return bool(getattr(self, "knowledge_regime", False))

    def repair(self, forget: Sequence[Batch], retain: Sequence[Batch], held: Batch | list[Batch] | None) -> bool:
        """The retain repair of the run that just ended (see the module docstring): up to `REPAIR_ROUNDS` rounds,
        each one constrained step down the retain loss from where the last one left the weights, until the held
        retain loss is back within the caller's budget (`repaired_enough`) or a round finds no length that lowers
        it. Needs retain batches, a held retain batch and an accepted step in this run; True when a repair step was
        kept. Each round's floor is read where it starts (so rounds may take the score down by `REPAIR_SCORE_SLACK`
        each, 0.004 in all); the ceiling is the first round's, so rounds cannot walk the score up."""
        host: Any = self
        self._repair_loss, self.repair_rounds = None, 0
        if not (self.repairs and retain and held is not None and any(r.accepted for r in host.run_records)):
            return False
        losses: list[Any] = []
        score = host.forget_score(forget, losses)[0]
        held_before = host._score_memo.held_loss(host, held)
        ceiling = self.repair_score_ceiling(score, len(losses[0]) if losses else 0)
        target = host.current_target()
        while self.repair_rounds < REPAIR_ROUNDS:
            floor = (score if target is None else min(score, target)) - REPAIR_SCORE_SLACK
            kept = self._repair_round(forget, retain, held, (floor, ceiling))
            if kept is None:
                break
            self.repair_rounds, score = self.repair_rounds + 1, kept
            if self.repaired_enough(host._score_memo.held_loss(host, held), held):
                break
        if self.repair_rounds:
            self._repair_loss = held_before
        return self.repair_rounds > 0

    def repaired_enough(self, held_loss: float, held: Batch | list[Batch]) -> bool:
        """Whether the held retain loss is within the budget the caller set, above its value at the start of the run
        (the knowledge regime relaxes the budget for the staged steps; the repair aims back at the caller's). Without
        a budget (None) one round is enough."""
        host: Any = self
        caller = host.caller_retain_increase
        if caller is None:
            return True
        return not over_retain_budget(held_loss, host.reference_retain_loss(held), caller)

    def _repair_round(self, forget: Sequence[Batch], retain: Sequence[Batch], held: Batch | list[Batch],
                      band: tuple[float, float]) -> float | None:
        """One repair step: the constrained direction down the retain loss at the current weights, its length
        searched on the held batch (see the module docstring). The forget score where it leaves the weights, or None
        when no length was kept (the weights as they were)."""
        host: Any = self
        held_before = host._score_memo.held_loss(host, held)
        descent = {n: -g for n, g in host.forget_gradient(list(retain)[:REPAIR_BATCHES], kind="nll").items()}
        direction = host.protected_direction(descent, host.group_gradients(forget, host.protect_groups))
        if not all_finite(direction.values()):
            return None
        params = host.named_params()
        snapshot = host._snapshot()
        eta = largest_trusted_step(params, direction, REPAIR_START, None, None, free=host.trust_free)
        longest = largest_trusted_step(params, direction, host.max_step_norm, None, None, free=host.trust_free)
        if not math.isfinite(eta) or eta <= 0:
            return None
        best: tuple[float, float, float] | None = None  # (η, held retain loss, forget score)
        halvings = 0
        try:
            for _ in range(REPAIR_POINTS + REPAIR_HALVINGS):
                trial = self._repair_trial(snapshot, direction, eta, forget, held, band,
                                           best[1] if best is not None else held_before)
                if trial is not None:
                    best = (eta, *trial)
                    if 2 * eta > longest:
                        break
                    eta *= 2
                elif best is None and halvings < REPAIR_HALVINGS:
                    halvings, eta = halvings + 1, eta / 2
                else:
                    break
        except BaseException:  # an error (or Ctrl-C) while measuring: the weights of before this round
            host._restore(snapshot)
            raise
        if best is None:
            host._restore(snapshot)
            return None
        host._apply_step(snapshot, direction, None, best[0])
        host._score_memo.remember_held(host, held, best[1])
        return best[2]

    def repair_score_ceiling(self, score_before: float, forget_examples: int) -> float:
        """The highest forget score a repair trial may leave: `score_before` or the target plus `REPAIR_SCORE_BAND`
        standard deviations of the score of alike sets of this many forget examples (this process's
        `forget_examples`, summed across processes) and holdout examples, whichever is higher. No ceiling (inf)
        without a holdout target: a `forget_target` score is a loss, which may rise."""
        host: Any = self
        target = host.current_target()
        if target is None or host.forget_target is not None or host._holdout_hist is None:
            return math.inf
        n = float(host.reduce(torch.tensor([float(forget_examples)], dtype=torch.float64))[0])
        m = float(host._holdout_hist.sum())
        return max(score_before, target + REPAIR_SCORE_BAND * null_score_sd(n, m))

    def _repair_trial(self, snapshot: Any, direction: Any, eta: float, forget: Sequence[Batch],
                      held: Batch | list[Batch], band: tuple[float, float], bar: float) -> tuple[float, float] | None:
        """(the held retain loss, the forget score) at `θ₀ + η d` when the loss is below `bar` with the score within
        `band` (floor, ceiling) and everything finite; else None. The held batch is measured first: a length that
        does not lower it needs no forget score."""
        host: Any = self
        host._apply_step(snapshot, direction, None, eta)
        loss = host.measure(held)
        if not math.isfinite(loss) or loss >= bar:
            return None
        if not all_finite(host.named_params().values()):
            return None
        score = host.forget_score(forget)[0]
        return (loss, score) if math.isfinite(score) and band[0] <= score <= band[1] else None
