"""The PNG plots of `benchmarks.run`: the privacy-utility frontier, the time to forget and the scaling curves."""

from __future__ import annotations

import math

COLORS = {"newton_kfac": "tab:blue", "newton_cg": "tab:cyan", "newton_woodfisher": "tab:purple",
          "newton_diagonal": "tab:olive", "fisher_removal": "tab:pink", "fisher_forgetting": "tab:brown",
          "gradient_ascent": "tab:red", "gradient_difference": "tab:orange", "npo": "tab:green",
          "retrain": "black", "original": "gray"}


def _fig_bytes(fig) -> bytes:
    from lightning_unlearn.report import figure_bytes

    return figure_bytes(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(rows: list[dict], context: dict) -> bytes:
    """Inserted-canary exposure (privacy, ↓) against test-perplexity change (utility cost, ←), one colour per method,
    each method's Pareto frontier joined."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        pts = sorted((r["test_perplexity_change_pct"], r["exposure_inserted"]) for r in rows if r["method"] == m)
        color = COLORS.get(m, None)
        marker = "*" if m in ("retrain", "original") else "o"
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, s=60 if marker == "*" else 25,
                   label=m, zorder=3)
        front, best = [], math.inf
        for x, y in pts:
            if y < best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], color=color, lw=1, alpha=0.7)
    ax.axhline(context["level_exposure"], color="black", ls=":", lw=1,
               label=f"level: retrained + {context['level_bits']:g} bit")
    ax.axhline(context["retrain_exposure"], color="black", ls="--", lw=0.8, label="retrained model")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("test perplexity change (%)  (← better)")
    ax.set_ylabel("inserted-canary exposure (bits)  (↓ better)")
    ax.set_title("Privacy-utility frontier per method")
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    ax.grid(alpha=0.3)
    return _fig_bytes(fig)


def plot_time_to_forget(ttf: dict[str, dict], context: dict) -> bytes:
    plt = _plt()
    names = list(ttf)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.5))
    reached = [ttf[n]["seconds"] for n in names]
    ymax = max([s for s in reached if s] + [1.0])
    for i, n in enumerate(names):
        s = ttf[n]["seconds"]
        if s is None:
            ax.barh(i, ymax, color="lightgray", hatch="//", edgecolor="gray")
            ax.text(ymax, i, f" not reached (best {ttf[n]['best_exposure']:.2f} bits)", va="center", fontsize=7)
        else:
            ax.barh(i, s, color=COLORS.get(n, "tab:blue"))
            ax.text(s, i, f" {s:.2f} s, ppl {ttf[n]['test_perplexity_change_pct']:+.1f} %", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds to bring inserted-canary exposure within "
                  f"{context['level_bits']:g} bit of the retrained model (log)")
    ax.set_title("Time to forget")
    ax.set_xlim(right=ymax * 30)
    return _fig_bytes(fig)


def plot_scaling(scale: dict[str, list[dict]]) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for backend in ("kfac", "cg", "woodfisher", "diagonal"):
        rows = [r for r in scale["model_size"] if r["backend"] == backend]
        x = [r["params"] / 1e6 for r in rows]
        axes[0, 0].plot(x, [r["seconds"] for r in rows], "o-", label=backend)
        axes[0, 1].plot(x, [r["memory_mb"] for r in rows], "o-", label=backend)
        rows = [r for r in scale["forget_size"] if r["backend"] == backend]
        x = [r["n_forget"] for r in rows]
        axes[1, 0].plot(x, [r["seconds"] for r in rows], "o-", label=backend)
        axes[1, 1].plot(x, [r["memory_mb"] for r in rows], "o-", label=backend)
    rows = [r for r in scale["model_size"] if r["backend"] == "kfac"]
    axes[0, 0].plot([r["params"] / 1e6 for r in rows], [r["fwd_bwd_seconds"] for r in rows], "k--",
                    label="one fwd+bwd")
    axes[0, 0].set(xlabel="model parameters (M)", ylabel="curvature fit + one solve (s)", xscale="log",
                   yscale="log", title="time vs model size")
    axes[0, 1].set(xlabel="model parameters (M)", ylabel="curvature state (MiB)", xscale="log", yscale="log",
                   title="memory vs model size")
    axes[1, 0].set(xlabel="forget-set sequences (curvature on the forget set)", ylabel="seconds", xscale="log",
                   yscale="log", title="time vs forget-set size")
    axes[1, 1].set(xlabel="forget-set sequences", ylabel="curvature state (MiB)", xscale="log", yscale="log",
                   title="memory vs forget-set size")
    for ax in axes.flat:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _fig_bytes(fig)
