"""The report's figures (matplotlib, Agg backend, PNG): training curves and FID against budget."""
from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(logs: dict[str, list[dict]], path) -> None:
    """Loss against kimg for each log (pretrain, tune), and the ECT stage against kimg."""
    fig, (ax_loss, ax_stage) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, lines in logs.items():
        if lines:
            ax_loss.plot([r["kimg"] for r in lines], [r["loss"] for r in lines], marker=".", label=name)
    ax_loss.set(xlabel="kimg", ylabel="loss (mean per tick)", yscale="log", title="training loss")
    ax_loss.legend()
    tune = logs.get("tune") or []
    ax_stage.step([r["kimg"] for r in tune], [r["stage"] for r in tune], where="post")
    ax_stage.set(xlabel="kimg", ylabel="stage", title="ECT stage (t-r shrinks each stage)")
    _save(fig, path)


def fid_curve(points: list[dict], device_type: str | None, path) -> None:
    """FID at each step count against the tuning budget in images, device-hours and FLOPs."""
    axes_of = [("kimg", "tuning kimg"),
               ("device_hours", "GPU-hours" if device_type == "cuda" else "device-hours (CPU)"),
               ("flops", "tuning FLOPs")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    keys = sorted({k for p in points for k in p if k.startswith("fid_")})
    for ax, (x, label) in zip(axes, axes_of, strict=True):
        usable = [p for p in points if p.get(x) is not None]
        for key in keys:
            ax.plot([p[x] for p in usable], [p[key] for p in usable], marker="o", label=key[4:].replace("step", "-step"))
        ax.set(xlabel=label, ylabel="FID", title=f"FID against {label}")
        if x == "flops":
            ax.set_xscale("log")
        ax.legend()
    _save(fig, path)


def scaling(points: list[dict], fits: list[dict], path) -> None:
    """FID against tuning FLOPs, log-log, a panel per step count: each run's points by size (circles: prefix
    budgets, triangles: batch-grown runs), each size's fitted law (dashed), and the laws of the compute
    frontier across sizes (solid: pure, dotted: with a floor)."""
    import numpy as np

    steps = sorted({k.split("_")[-1] for p in points for k in p["mean"] if k.startswith("fid_")}, key=int)
    sizes = list(dict.fromkeys(p["size"] for p in points))
    fig, axes = plt.subplots(1, len(steps), figsize=(5.2 * len(steps), 3.8), squeeze=False)
    for ax, step in zip(axes[0], steps, strict=True):
        key = f"fid_{step}"
        for i, size in enumerate(sizes):
            color = f"C{i}"
            for design, marker in (("prefix", "o"), ("batch", "^")):
                mine = sorted((p for p in points if p["size"] == size and p["design"] == design and key in p["mean"]),
                              key=lambda p: p["compute"])
                if mine:
                    ax.plot([p["compute"] for p in mine], [p["mean"][key] for p in mine], marker, color=color,
                            label=f"size {size}" + (" (batch-grown)" if design == "batch" else ""))
            law = next((f for f in fits if f["name"] == f"{size}-{step}step"), None)
            if law:
                c = np.geomspace(min(p["x"] for p in law["points"]), max(p["x"] for p in law["points"]), 50)
                ax.plot(c, law["coefficient"] * c ** -law["exponent"], "--", color=color)
        law = next((f for f in fits if f["name"] == f"{step}step"), None)
        if law:
            c = np.geomspace(min(p["compute"] for p in points), max(p["compute"] for p in points), 50)
            ax.plot(c, law["coefficient"] * c ** -law["exponent"], "-", color="k",
                    label=f"frontier: exponent {law['exponent']:.3f}")
            sat = law["saturating"]
            if sat["exponent"] is not None:
                ax.plot(c, sat["coefficient"] * c ** -sat["exponent"] + sat["floor"], ":", color="k",
                        label=f"with a floor: exponent {sat['exponent']:.3f}, floor {sat['floor']:.3g}")
        ax.set(xscale="log", yscale="log", xlabel="tuning FLOPs", ylabel="FID", title=f"{step}-step")
        for axis in (ax.xaxis, ax.yaxis):  # label the decades only: minor labels overlap
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    _save(fig, path)
