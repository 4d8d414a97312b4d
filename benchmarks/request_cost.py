"""What one deletion request costs: its time and passes per phase, and how its time scales.

`count_request_passes(model)` counts forward and backward passes in examples: forwards at the input embedding
(`benchmarks.passes.count_passes`), backwards at the output logits (every backward from a loss goes through them,
also a gradient taken only for some blocks' weights, which stops before the input embedding; the engine's
gradients, `torch.autograd.grad` over the curvature's parameters, are of that kind).

`profiled_request(model, ...)` runs `serve_request` unchanged and measures it from outside: the whole request is
timed and its forward/backward examples counted (`count_request_passes`), and for the duration of the call its
phases are wrapped: `request_curvature` of `lightning_unlearn.request` (patched in that module for the call: the
curvature fit) and the public methods (`PHASES`) of the unlearner that `prepare_request` returns (wrapped on that
instance only). Each phase gets its seconds, forward examples, backward examples and calls; a phase called inside
another (`forget_gradient` inside `holdout_gradients`, `measure` inside `check_holdout`) belongs to the outer one, so
the phases never overlap and their seconds sum to at most the request's. `other` is the rest of the request (the
projection of `_direction` outside the solves `newton_direction(s)`, snapshots, weight checks, data preparation):
no forward or backward pass.

`request_scaling(preset, say)` times the default request (`UnlearnSettings()`, holdout target) on briefly trained
random-token GPT-2 models of the preset's sizes and forget-set sizes and fits the log-log exponent of the request's
time against parameters and against forget examples (`scaling.request` in results.json).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch import nn

from benchmarks.passes import count_passes, fwd_bwd_seconds

#: the unlearner's methods timed as phases, when the method has them (in call order of a default request)
#: (`group_gradients` on its own: the retain protection's gradients of the knowledge regime, `protect_retain`;
#: `memorised_share`: the regime's check of the first retain batch)
PHASES = ("fit_curvature", "calibrate", "check_holdout", "memorised_share", "holdout_gradients", "group_gradients",
          "forget_gradient", "newton_direction", "newton_directions", "constrained_newton_direction",
          "measure_forget_score", "measure", "repair")
COUNTS = ("forward_examples", "backward_examples")


PASS_KEYS = ("forward_calls", "forward_examples", "backward_calls", "backward_examples")


class PassCounts:
    """The live counts of `count_request_passes` (`counts[key]`, `snapshot()`): forwards from `count_passes`,
    backwards from the logits hook (from `count_passes` for a model without an output embedding)."""

    def __init__(self, inner: dict[str, int], head: dict[str, int] | None) -> None:
        self._inner, self._head = inner, head

    def __getitem__(self, key: str) -> int:
        return (self._head if key.startswith("backward") and self._head is not None else self._inner)[key]

    def snapshot(self) -> dict[str, int]:
        return {k: self[k] for k in PASS_KEYS}


@contextmanager
def count_request_passes(model: nn.Module) -> Iterator[PassCounts]:
    """Counts, while open: `forward_calls`/`forward_examples` (`count_passes`: rows through the input embedding) and
    `backward_calls`/`backward_examples` (rows of the output logits a gradient flowed back through)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backward = {"backward_calls": 0, "backward_examples": 0}

    def on_logits(_: nn.Module, args: tuple, out: Any) -> None:
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            rows = int(out.shape[0])

            def hook(_: torch.Tensor) -> None:
                backward["backward_calls"] += 1
                backward["backward_examples"] += rows

            out.register_hook(hook)

    handle = head.register_forward_hook(on_logits) if head is not None else None
    try:
        with count_passes(model) as inner:
            yield PassCounts(inner, backward if handle is not None else None)
    finally:
        if handle is not None:
            handle.remove()


class PhaseProfiler:
    """Seconds, forward/backward examples and calls per phase; `wrap(name, fn)` times `fn` as `name`. A wrapped
    call made inside another (e.g. `forget_gradient` inside `holdout_gradients`) belongs to the outer phase, so the
    phases never overlap. `counts`: the live `count_request_passes` of the model the phases run on."""

    def __init__(self, counts: PassCounts) -> None:
        self.counts = counts
        self.phases: dict[str, dict[str, float]] = {}
        self._inside = False

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._inside:
                return fn(*args, **kwargs)
            self._inside = True
            before = {k: self.counts[k] for k in COUNTS}
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                self._inside = False
                entry = self.phases.setdefault(name, {"seconds": 0.0, **dict.fromkeys(COUNTS, 0), "calls": 0})
                entry["seconds"] += seconds
                for k in COUNTS:
                    entry[k] += self.counts[k] - before[k]
                entry["calls"] += 1

        return timed

    def instrument(self, unlearner: Any) -> Any:
        """Wrap the `PHASES` methods on this unlearner instance (the class is untouched)."""
        for name in PHASES:
            method = getattr(unlearner, name, None)
            if callable(method):
                setattr(unlearner, name, self.wrap(name, method))
        return unlearner

    def breakdown(self, seconds: float, totals: dict[str, int]) -> dict[str, dict[str, float]]:
        """The phases in call order, then `other`: the request's `seconds` and `totals` not spent in any phase."""
        out = {name: dict(v) for name, v in self.phases.items()}
        other = {"seconds": max(0.0, seconds - sum(v["seconds"] for v in out.values())), "calls": 1}
        for k in COUNTS:
            other[k] = totals[k] - sum(v[k] for v in out.values())
        out["other"] = other
        return out


@contextmanager
def _patched_request(profiler: PhaseProfiler) -> Iterator[None]:
    """For the duration, in `lightning_unlearn.request` (which looks both up at call time): `request_curvature` timed
    as the phase `curvature`, and the unlearner `prepare_request` returns instrumented (`PhaseProfiler.instrument`)."""
    from lightning_unlearn import request as request_module

    prepare = request_module.prepare_request

    def prepare_and_instrument(*args: Any, **kwargs: Any) -> Any:
        return profiler.instrument(prepare(*args, **kwargs))

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(request_module, "request_curvature",
                                              profiler.wrap("curvature", request_module.request_curvature)))
        stack.enter_context(mock.patch.object(request_module, "prepare_request", prepare_and_instrument))
        yield


def profiled_request(model: nn.Module, forget: Sequence[dict], retain: Sequence[dict] | None,
                     holdout: Sequence[dict] | None, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """`serve_request(model, forget, retain, holdout, **kwargs)` with its cost: (the `RequestResult`, {"seconds",
    "forward_examples", "backward_examples", "forward_calls", "backward_calls", "breakdown": {phase: {"seconds",
    "forward_examples", "backward_examples", "calls"}}})."""
    from lightning_unlearn.request import serve_request

    with count_request_passes(model) as counts:
        profiler = PhaseProfiler(counts)
        with _patched_request(profiler):
            start = time.perf_counter()
            result = serve_request(model, forget, retain, holdout, **kwargs)
            seconds = time.perf_counter() - start
        totals = counts.snapshot()
    return result, {"seconds": seconds, **totals, "breakdown": profiler.breakdown(seconds, totals)}


def mean_breakdown(breakdowns: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per phase, the mean of each number over the breakdowns (a phase missing from one counts as 0 there)."""
    names = list(dict.fromkeys(name for b in breakdowns for name in b))
    if "other" in names:  # the remainder last
        names.remove("other")
        names.append("other")
    out = {}
    for name in names:
        keys = list(dict.fromkeys(k for b in breakdowns for k in b.get(name, {})))
        out[name] = {k: sum(float(b.get(name, {}).get(k, 0.0)) for b in breakdowns) / len(breakdowns) for k in keys}
    return out


def breakdown_markdown(breakdown: dict[str, dict[str, float]], seconds: float | None) -> list[str]:
    """A markdown table of a breakdown (phases in call order, `other` last) with each phase's share of `seconds`."""
    lines = ["| phase | seconds | share % | forward examples | backward examples | calls |", "|" + "---|" * 6]
    for name, v in breakdown.items():
        share = 100.0 * v["seconds"] / seconds if seconds else float("nan")
        lines.append(f"| {name} | {v['seconds']:.3g} | {share:.0f} | {v['forward_examples']:.0f} | "
                     f"{v['backward_examples']:.0f} | {v['calls']:.3g} |")
    return lines


# ---------------------------------------------------------------------------------------------------- scaling
def loglog_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The least-squares slope of log y against log x (None with fewer than 2 distinct positive x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


def _batches(rows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": rows[i:i + batch_size], "attention_mask": torch.ones_like(rows[i:i + batch_size]),
             "labels": rows[i:i + batch_size].clone()} for i in range(0, len(rows), batch_size)]


@dataclass
class ScalingData:
    """Sequences of two random sparse Markov chains: a pool of the second the model is trained on (its first n rows
    are a forget set of n) and holdout batches of it (never trained on); retain batches of the first (trained on; the
    curvature source) and a held retain batch of it (never trained on). The forget set is then of a kind the retain
    data is not, and the holdout of that kind sits at a level the forget set can be unlearned to, as with canaries
    or a person's facts. (Random tokens, the first form of this data, left the holdout above the uniform
    distribution's loss, and every request stopped at its run's trust region.)"""

    pool: torch.Tensor
    retain: list[dict[str, torch.Tensor]]
    held: dict[str, torch.Tensor]
    holdout: list[dict[str, torch.Tensor]]
    batch_size: int

    def forget(self, n: int) -> list[dict[str, torch.Tensor]]:
        return _batches(self.pool[:n], self.batch_size)


def markov_sequences(n: int, seq_len: int, states: int, successors: int, g: torch.Generator) -> torch.Tensor:
    """`n` sequences of a random Markov chain over tokens 1..states in which each token has `successors` possible
    next tokens (uniformly likely: ln(successors) nats per token for a model that knows the chain)."""
    table = torch.stack([torch.randperm(states, generator=g)[:successors] + 1 for _ in range(states + 1)])
    rows = torch.empty(n, seq_len, dtype=torch.long)
    rows[:, 0] = torch.randint(1, states + 1, (n,), generator=g)
    for t in range(1, seq_len):
        rows[:, t] = table[rows[:, t - 1], torch.randint(0, successors, (n,), generator=g)]
    return rows


def scaling_data(n_pool: int, retain_batches: int, batch_size: int, seq_len: int, vocab: int,
                 seed: int = 0, states: int = 64, successors: int = 4) -> ScalingData:
    """Each chain uses `states` of the `vocab` tokens, few enough that brief training learns it."""
    g = torch.Generator().manual_seed(seed)
    states = min(states, vocab - 1)
    n_holdout = 2 * batch_size
    retain = _batches(markov_sequences((retain_batches + 1) * batch_size, seq_len, states, successors, g), batch_size)
    other = markov_sequences(n_pool + n_holdout, seq_len, states, successors, g)
    return ScalingData(other[:n_pool], retain[:-1], retain[-1], _batches(other[n_pool:], batch_size), batch_size)


def train_briefly(model: nn.Module, data: ScalingData, epochs: int, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """`epochs` passes of Adam over the pool (each pool batch with the next retain batch), so that the forget
    sequences are partly memorised and the request has work to do."""
    from lightning_unlearn.methods.losses import mean_nll

    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    pool = data.forget(len(data.pool))
    for epoch in range(epochs):
        for i, b in enumerate(pool):
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for batch in (b, data.retain[(epoch * len(pool) + i) % len(data.retain)]):
                s, n = mean_nll(model, batch)
                loss = loss + s / max(n, 1)
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def request_point(model: nn.Module, data: ScalingData, n_forget: int) -> dict[str, Any]:
    """The default request (`UnlearnSettings()`) forgetting the first `n_forget` pool rows of a copy of `model`, with
    one forward+backward over the forget set and the curvature batches as the unit."""
    from lightning_unlearn.settings import UnlearnSettings

    forget = data.forget(n_forget)
    fb = fwd_bwd_seconds(model, forget + data.retain)
    work = copy.deepcopy(model).eval()
    result, cost = profiled_request(work, forget, data.retain, data.holdout, settings=UnlearnSettings(),
                                    held_retain=data.held)
    s = result.summary
    return {"params": sum(p.numel() for p in model.parameters()), "n_forget": n_forget, **cost,
            "fwd_bwd_seconds": fb, "time_over_fwd_bwd": cost["seconds"] / fb, "status": s.get("status"),
            "steps_accepted": s.get("steps_accepted"), "evaluations": s.get("evaluations"),
            "forget_score_before": s.get("forget_score_before"), "forget_score_after": s.get("forget_score_after")}


def request_scaling(preset: Any, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The default request's time against model size (`preset.scaling_sizes`, forget set = one batch) and against
    forget-set size (`preset.scaling_forget`, on `preset.scaling_forget_model`), each model trained briefly
    (`preset.scaling_train_epochs` passes over the largest forget set), with the fitted log-log exponents."""
    import warnings

    from lightning_unlearn.models import small_causal_lm

    p = preset
    data = scaling_data(max(p.scaling_forget), p.scaling_batches, p.scaling_batch_size, p.scaling_seq_len,
                        p.scaling_vocab)

    models: dict[tuple[int, int], nn.Module] = {}

    def trained(hidden: int, layers: int) -> nn.Module:
        if (hidden, layers) not in models:
            model = small_causal_lm("gpt2", vocab_size=p.scaling_vocab, hidden=hidden, layers=layers,
                                    heads=max(1, hidden // 32), max_positions=p.scaling_seq_len, seed=0)
            models[(hidden, layers)] = train_briefly(model, data, p.scaling_train_epochs)
        return models[(hidden, layers)]

    by_model, by_forget = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a request that accepts nothing warns; its status is recorded instead
        for hidden, layers in p.scaling_sizes:
            point = request_point(trained(hidden, layers), data, p.scaling_batch_size)
            by_model.append({"hidden": hidden, "layers": layers, **point})
            say(f"request scaling: {hidden}x{layers} ({point['params'] / 1e6:.2f}M params) {point['seconds']:.2f} s "
                f"(x{point['time_over_fwd_bwd']:.1f} fwd+bwd), {point['status']}")
        hidden, layers = p.scaling_forget_model
        for n_forget in p.scaling_forget:
            # the same model and forget set as a point of the model-size curve: that point, not a second run
            same = [r for r in by_model if (r["hidden"], r["layers"], r["n_forget"]) == (hidden, layers, n_forget)]
            point = same[0] if same else {"hidden": hidden, "layers": layers,
                                          **request_point(trained(hidden, layers), data, n_forget)}
            by_forget.append(point)
            say(f"request scaling: forget set of {n_forget} sequences {point['seconds']:.2f} s "
                f"(x{point['time_over_fwd_bwd']:.1f} fwd+bwd), {point['status']}")
    return {
        "model_size": by_model, "forget_size": by_forget,
        "exponent_params": loglog_exponent([r["params"] for r in by_model], [r["seconds"] for r in by_model]),
        "exponent_forget": loglog_exponent([r["n_forget"] for r in by_forget], [r["seconds"] for r in by_forget]),
        "fwd_bwd_exponent_params": loglog_exponent([r["params"] for r in by_model],
                                                   [r["fwd_bwd_seconds"] for r in by_model]),
        "fwd_bwd_exponent_forget": loglog_exponent([r["n_forget"] for r in by_forget],
                                                   [r["fwd_bwd_seconds"] for r in by_forget]),
        "setup": {"settings": "UnlearnSettings() (the default recipe, holdout target)",
                  "data": "sequences of two random sparse Markov chains (forget set and holdout of one, retain of "
                          f"the other), vocabulary {p.scaling_vocab}, {p.scaling_seq_len} tokens per sequence",
                  "curvature_batches": p.scaling_batches, "batch_size": p.scaling_batch_size,
                  "holdout_sequences": len(data.holdout) * p.scaling_batch_size,
                  "train_epochs": p.scaling_train_epochs,
                  "model_size_forget_sequences": p.scaling_batch_size},
    }


def plot_request_scaling(request: dict[str, Any]) -> bytes:
    """Request seconds (and one forward+backward) against parameters and against forget examples, log-log, with the
    fitted exponents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_unlearn.report import figure_bytes

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, key, exponent, label in (
            (axes[0], request["model_size"], "params", request.get("exponent_params"), "model parameters"),
            (axes[1], request["forget_size"], "n_forget", request.get("exponent_forget"), "forget-set sequences")):
        xs = [r[key] for r in rows]
        ys = [r["seconds"] for r in rows]
        ax.plot(xs, ys, "o-", color="tab:blue", label="default request" + (
            f" (slope {exponent:.2f})" if exponent is not None else ""))
        ax.plot(xs, [r["fwd_bwd_seconds"] for r in rows], "k--", label="one fwd+bwd (forget + curvature batches)")
        if exponent is not None and xs:
            lx = [math.log(x) for x in xs]
            ly = [math.log(y) for y in ys]
            c = sum(ly) / len(ly) - exponent * sum(lx) / len(lx)
            ax.plot(xs, [math.exp(c) * x**exponent for x in xs], ":", color="tab:blue", lw=1)
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="seconds",
               title=f"default request vs {label}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_bytes(fig)


def scaling_markdown(request: dict[str, Any]) -> list[str]:
    """The request-scaling section of results.md."""
    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.2f}"

    s = request["setup"]
    lines = ["## Scaling of the default request", "",
             f"`{s['settings']}` on GPT-2 models trained {s['train_epochs']} epochs on {s['data']}; "
             f"{s['curvature_batches']} curvature batches of {s['batch_size']}, {s['holdout_sequences']} holdout "
             "sequences. Fitted log-log exponents (least squares): time ∝ params^"
             f"{fmt(request['exponent_params'])} (one fwd+bwd: ^{fmt(request['fwd_bwd_exponent_params'])}), "
             f"time ∝ forget^{fmt(request['exponent_forget'])} (one fwd+bwd: "
             f"^{fmt(request['fwd_bwd_exponent_forget'])}).", "",
             "| curve | hidden x layers | params | forget sequences | seconds | / fwd+bwd | forward ex. | "
             "backward ex. | status |", "|" + "---|" * 9]
    points = [("model size", r) for r in request["model_size"]] + [("forget size", r) for r in request["forget_size"]]
    for curve, r in points:
        lines.append(f"| {curve} | {r['hidden']}x{r['layers']} | {r['params'] / 1e6:.3g}M | {r['n_forget']} | "
                     f"{r['seconds']:.3g} | {r['time_over_fwd_bwd']:.3g} | {r['forward_examples']} | "
                     f"{r['backward_examples']} | {r['status']} |")
    return lines
