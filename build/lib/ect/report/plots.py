"""The report's figures (matplotlib, Agg backend, PNG): training curves and FID against budget."""
from __future__ import annotations

import matplotlib

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


def fid_curve(points: list[dict], path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    keys = sorted({k for p in points for k in p if k.startswith("fid_")})
    for key in keys:
        ax.plot([p["kimg"] for p in points], [p[key] for p in points], marker="o", label=key[4:].replace("step", "-step"))
    ax.set(xlabel="tuning kimg", ylabel="FID", title="FID against training budget")
    ax.legend()
    _save(fig, path)
