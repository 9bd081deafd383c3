"""The figures of the weight-decomposition analysis (commonsense.decomposition), in the paper's style."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from .decomposition import step_order


def _steps(rows: List[dict]) -> List[str]:
    return sorted({r["step"] for r in rows}, key=step_order)


def plot_scatter(rows: List[dict], fits: List[dict], path: Path) -> None:
    """One panel per (module, run): Delta D on x, Delta M on y, colour = layer, marker = step,
    with the least-squares line and Pearson r (the paper's Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    modules = list(dict.fromkeys(r["module"] for r in rows))
    fit_of: Dict[tuple, dict] = {(f["run"], f["module"]): f for f in fits}
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    layers = sorted({r["layer"] for r in rows})
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(modules), len(runs), figsize=(4.2 * len(runs), 3.6 * len(modules)), squeeze=False)
    for i, module in enumerate(modules):
        for j, run in enumerate(runs):
            ax = axes[i][j]
            group = [r for r in rows if r["run"] == run and r["module"] == module]
            for k, step in enumerate(_steps(group)):
                points = [r for r in group if r["step"] == step]
                ax.scatter([p["delta_d"] for p in points], [p["delta_m"] for p in points],
                           c=[cmap(layers.index(p["layer"]) / max(1, len(layers) - 1)) for p in points],
                           marker=markers[k % len(markers)], s=22, label=f"step {step}", edgecolors="none")
            fit = fit_of[(run, module)]
            xs = [p["delta_d"] for p in group]
            ys = [p["delta_m"] for p in group]
            if fit["slope"] == fit["slope"]:  # not NaN
                x0, x1 = min(xs), max(xs)
                y_mean, x_mean = sum(ys) / len(ys), sum(xs) / len(xs)
                ax.plot([x0, x1], [y_mean + fit["slope"] * (x0 - x_mean), y_mean + fit["slope"] * (x1 - x_mean)],
                        color="crimson", linewidth=1)
            ax.set_title(f"{run} ({group[0]['method']}), {module}: r = {fit['pearson_r']:+.2f}", fontsize=9)
            ax.set_xlabel("ΔD (1 - cos)")
            ax.set_ylabel("ΔM (|m - m0|)")
            ax.ticklabel_format(style="sci", scilimits=(-3, 3))
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle("Magnitude vs direction change per layer and step (colour: layer, marker: step)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layers(rows: List[dict], path: Path) -> None:
    """Delta M and Delta D per layer at each run's last step, one line per run (the paper's
    commonsense figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    modules = list(dict.fromkeys(r["module"] for r in rows))
    fig, axes = plt.subplots(len(modules), 2, figsize=(10, 3.4 * len(modules)), squeeze=False)
    for i, module in enumerate(modules):
        for run in runs:
            group = [r for r in rows if r["run"] == run and r["module"] == module]
            last = _steps(group)[-1]
            points = sorted((r for r in group if r["step"] == last), key=lambda r: r["layer"])
            for j, key in enumerate(("delta_m", "delta_d")):
                axes[i][j].plot([p["layer"] for p in points], [p[key] for p in points], marker="o", markersize=3,
                                label=f"{run} ({points[0]['method']})")
        for j, label in enumerate(("ΔM", "ΔD")):
            axes[i][j].set_title(f"{label} per layer, {module}, last step", fontsize=9)
            axes[i][j].set_xlabel("layer")
            axes[i][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
