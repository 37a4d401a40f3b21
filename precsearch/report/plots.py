"""PNG plots of a search (matplotlib, imported only here and only when a plot is drawn)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from precsearch.runtime.precisions import FP32, PRECISIONS
from precsearch.search.trials import pareto_front

COLORS = {name: p.color for name, p in PRECISIONS.items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tradeoff(trials: Any, limit: float, baseline_ms: float, chosen_trial: int | None, path: Path,
             metric: str, budget: str = "") -> Path:
    """Error vs latency of every trial, the feasible Pareto front, the limit and the baseline;
    weight memory as the feasible points' colour (the third axis), and the trials within the
    accuracy limit but over the memory ``budget`` (its text, e.g. ``weight memory <= 40 MB``) marked."""
    plt = _pyplot()
    done = trials[trials["state"] == "COMPLETE"]
    finite = done[done["error"].notna() & done["error"].map(lambda e: e is not None and math.isfinite(e))]
    broken = done[~done.index.isin(finite.index)]
    positive = finite["error"][finite["error"] > 0]
    floor = positive.min() / 3 if len(positive) else limit / 100
    top = max(finite["error"].max() if len(finite) else limit, limit) * 3
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    feasible, infeasible = finite[finite["feasible"]], finite[~finite["feasible"]]
    over_budget = infeasible[infeasible["error"] <= limit]   # accurate enough, infeasible: over the memory budget
    infeasible = infeasible[infeasible["error"] > limit]
    ax.scatter(infeasible["latency_ms"], infeasible["error"].clip(lower=floor), s=28, facecolors="none",
               edgecolors="#c0392b", label="violates the limit")
    if len(over_budget):
        ax.scatter(over_budget["latency_ms"], over_budget["error"].clip(lower=floor), s=34, marker="s",
                   facecolors="none", edgecolors="#e67e22", label=f"over the memory budget ({budget or 'memory'})")
    weights = feasible["weight_mb"] if "weight_mb" in feasible else None
    if weights is not None and len(feasible) and weights.notna().all():
        points = ax.scatter(feasible["latency_ms"], feasible["error"].clip(lower=floor), s=28, c=weights,
                            cmap="viridis", edgecolors="#27ae60", linewidths=0.8,
                            label="meets the limit (colour: weight memory)")
        fig.colorbar(points, ax=ax, label="weight memory as the plan runs (MB)")
    else:
        ax.scatter(feasible["latency_ms"], feasible["error"].clip(lower=floor), s=28, color="#27ae60",
                   label="meets the limit")
    if "speedup_low" in feasible and feasible["speedup_low"].notna().any():
        # latency on the FP32 basis is baseline / speedup: the speedup's interval, mapped
        scale = feasible["latency_ms"] * feasible["speedup"]
        ax.errorbar(feasible["latency_ms"], feasible["error"].clip(lower=floor), fmt="none", ecolor="#27ae60",
                    alpha=0.5, lw=1, xerr=[(feasible["latency_ms"] - scale / feasible["speedup_high"]).clip(lower=0),
                                           (scale / feasible["speedup_low"] - feasible["latency_ms"]).clip(lower=0)],
                    label="95% interval of the latency")
    if len(broken):
        ax.scatter(broken["latency_ms"], [top] * len(broken), marker="x", color="#c0392b",
                   label="non-finite output (inf/NaN)")
    front = feasible.loc[[i for i, _ in pareto_front(list(feasible.iterrows()),
                                                     key=lambda item: (item[1]["latency_ms"], item[1]["error"]))]]
    if len(front):
        ax.step(front["latency_ms"], front["error"].clip(lower=floor), where="post", color="#27ae60", lw=1.5,
                label="Pareto front (feasible)")
    ax.axhline(limit, color="#c0392b", ls="--", lw=1, label=f"limit {metric} = {limit:g}")
    ax.axvline(baseline_ms, color=COLORS[FP32], ls=":", lw=1, label=f"fp32 baseline {baseline_ms:.3g} ms")
    if chosen_trial is not None and chosen_trial in set(done["trial"]):
        row = done[done["trial"] == chosen_trial].iloc[0]
        ax.scatter([row["latency_ms"]], [max(row["error"], floor)], s=160, marker="*", color="#f1c40f",
                   edgecolors="black", zorder=5, label=f"chosen plan (trial {chosen_trial})")
    ax.set_yscale("log")
    ax.set_ylim(floor / 1.5, top * 1.5)
    ax.set_xlabel("latency per batch (ms, normalised to the fp32 baseline's run)")
    ax.set_ylabel(f"error ({metric}, log scale; 0 drawn at the bottom)")
    ax.set_title("Every trial: error vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def progress(trials: Any, baseline_ms: float, path: Path) -> Path:
    """Best feasible latency after each trial."""
    plt = _pyplot()
    done = trials[trials["state"] == "COMPLETE"].sort_values("trial")
    best, current = [], math.nan
    for _, row in done.iterrows():
        if row["feasible"] and not (current <= row["latency_ms"]):
            current = row["latency_ms"]
        best.append(current)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ax.step(done["trial"], best, where="post", color="#27ae60", lw=2, label="best feasible plan so far")
    ax.axhline(baseline_ms, color=COLORS[FP32], ls=":", label=f"fp32 baseline {baseline_ms:.3g} ms")
    ax.set_xlabel("trial")
    ax.set_ylabel("latency per batch (ms)")
    ax.set_title("Search progress")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def block_of(unit: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3``: one row per numbered block."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", unit)
    return match.group(1) if match else (unit.split(".")[0] or "<root>")


def _label(unit: str, block: str) -> str:
    """A box label: the unit's name inside its block, shortened to its last parts."""
    inner = unit[len(block) + 1:] if unit.startswith(block + ".") else unit or "<root>"
    parts = inner.split(".")
    for start in range(len(parts)):
        label = ".".join(parts[start:])
        if len(label) <= 18:
            return label
    return parts[-1][:17] + "…"


def unit_map(units: list[str], precision: dict[str, str], edges: list[list[str]], path: Path,
             title: str = "Precision of every unit") -> Path:
    """The units as boxes, one row per block in execution order, coloured by dtype; data-flow
    edges drawn faintly."""
    plt = _pyplot()
    from matplotlib.patches import Patch, Rectangle

    rows: dict[str, list[str]] = {}
    for unit in units:
        rows.setdefault(block_of(unit), []).append(unit)
    width = max(len(members) for members in rows.values())
    fig_height = max(2.5, 0.32 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(min(max(5.0, 1.5 * width + 2.0), 16.0), fig_height), dpi=110)
    centre = {}
    for y, (block, members) in enumerate(rows.items()):
        for x, unit in enumerate(members):
            ax.add_patch(Rectangle((x + 0.05, -y - 0.4), 0.9, 0.8, color=COLORS[precision.get(unit, FP32)]))
            ax.text(x + 0.5, -y, _label(unit, block), ha="center", va="center", fontsize=6, color="white")
            centre[unit] = (x + 0.5, -y)
    for source, target in edges:
        if source in centre and target in centre:
            (x0, y0), (x1, y1) = centre[source], centre[target]
            ax.plot([x0, x1], [y0, y1], color="black", alpha=0.12, lw=0.6, zorder=0)
    ax.set_yticks([-y for y in range(len(rows))], list(rows), fontsize=7)
    ax.set_xticks([])
    ax.set_xlim(0, width)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    counts = {d: sum(precision.get(u, FP32) == d for u in units) for d in COLORS}
    fig.legend(handles=[Patch(color=COLORS[d], label=f"{d} ({counts[d]} units)") for d in COLORS],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.set_title(title)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    fig.tight_layout(rect=(0, 0.6 / fig_height, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
