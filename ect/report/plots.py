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
    """FID against tuning FLOPs, log-log, a panel per step count: each size's points and fitted law
    (dashed), and the law of the compute frontier across sizes (solid)."""
    import numpy as np

    steps = sorted({s for p in points for s in p["fid"]}, key=int)
    sizes = list(dict.fromkeys(p["size"] for p in points))
    fig, axes = plt.subplots(1, len(steps), figsize=(5.2 * len(steps), 3.8), squeeze=False)
    for ax, step in zip(axes[0], steps, strict=True):
        for i, size in enumerate(sizes):
            mine = sorted((p for p in points if p["size"] == size), key=lambda p: p["compute"])
            color = f"C{i}"
            ax.plot([p["compute"] for p in mine], [p["fid"][step] for p in mine], "o", color=color, label=f"size {size}")
            law = next((f for f in fits if f["size"] == size and f["steps"] == step), None)
            if law:
                c = np.geomspace(mine[0]["compute"], mine[-1]["compute"], 50)
                ax.plot(c, law["coefficient"] * c ** -law["exponent"], "--", color=color)
        law = next((f for f in fits if f["frontier"] and f["steps"] == step), None)
        if law:
            c = np.geomspace(min(p["compute"] for p in points), max(p["compute"] for p in points), 50)
            ax.plot(c, law["coefficient"] * c ** -law["exponent"], "-", color="k",
                    label=f"frontier: exponent {law['exponent']:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="tuning FLOPs", ylabel="FID", title=f"{step}-step")
        for axis in (ax.xaxis, ax.yaxis):  # label the decades only: minor labels overlap
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
    _save(fig, path)
