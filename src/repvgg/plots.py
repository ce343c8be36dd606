"""PNG figures for run folders (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from repvgg.serialization import atomic_write

__all__ = ["pyplot", "place_labels", "plot_curves", "plot_points", "plot_throughput", "plot_training_curves",
           "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG atomically (a failed write names the file and leaves the old one) and close it."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        pyplot().close(fig)
    return path


def plot_curves(
    history: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    losses: Mapping[str, str],
    scores: Mapping[str, str],
    loss_label: str,
    score_label: str,
    title: str = "",
) -> Path:
    """Per-epoch curves, losses on the left and scores on the right; the mappings are legend -> history key.

    Losses are drawn on a log scale: early validation losses (BatchNorm statistics far off in the first
    epoch) can be orders of magnitude above the rest and would flatten every other point.
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, series, ylabel in ((ax_loss, losses, loss_label), (ax_score, scores, score_label)):
        for legend, key in series.items():
            ax.plot(epochs, [row[key] for row in history], label=legend, marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_values = [row[key] for key in losses.values() for row in history]
    if loss_values and min(loss_values) > 0:
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel(f"{loss_label} (log scale)")
    if title:
        fig.suptitle(title)
    # fixed margins: every run draws this figure, and tight_layout's measuring pass costs more than the drawing
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.12, top=0.88 if title else 0.95, wspace=0.28)
    return save_figure(fig, path)


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Classification runs: loss (train/val) and top-1 accuracy (train/val) per epoch."""
    return plot_curves(history, path, losses={"train": "train_loss", "val": "val_loss"},
                       scores={"train top-1": "train_top1", "val top-1": "val_top1"},
                       loss_label="cross-entropy", score_label="accuracy (%)", title=title)


def plot_throughput(result: Any, path: str | os.PathLike[str], dtype: str = "float32") -> Path:
    """Throughput against parameters, one point per model (its fastest form), like the paper's Fig. 1."""
    plt = pyplot()
    best: dict[tuple[str, str], Any] = {}
    for r in result.rows:
        if r.dtype != dtype or r.form in ("conv3x3", "train") or r.throughput is None:
            continue
        family = "timm" if r.form == "timm" else ("repvgg" if r.model in result.config.models else "baseline")
        key = (r.model, family)
        if key not in best or r.throughput > (best[key].throughput or 0):
            best[key] = r
    if not best:
        raise ValueError(f"no {dtype} throughput measurements to plot")
    styles = {"repvgg": ("tab:red", "o", "RepVGG (converted, fastest form)"),
              "baseline": ("tab:blue", "s", "baseline (conv-BN fused, fastest form)"),
              "timm": ("tab:gray", "^", "timm RepVGG (re-parameterized, eager)")}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for family, (color, marker, label) in styles.items():
        points = [r for (_, f), r in best.items() if f == family]
        if points:
            ax.scatter([p.params / 1e6 for p in points], [p.throughput for p in points], c=color, marker=marker,
                       s=50, label=label, zorder=3)
            for p in points:
                ax.annotate(f"{p.model}\n{p.backend}", (p.params / 1e6, p.throughput), fontsize=7,
                            xytext=(5, 3), textcoords="offset points")
    env = result.environment
    where = env.get("gpu") or f"{env.get('cpu')}, {env.get('torch_threads')} threads"
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"images/s (batch {result.config.batch_size}, {dtype})")
    ax.set_title(f"Throughput vs size: {where}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_points(points: Sequence[tuple[str, float, float, str]], path: str | os.PathLike[str], *, xlabel: str,
                ylabel: str, title: str = "", logx: bool = False, logy: bool = False,
                legend: str = "best") -> Path:
    """A labelled scatter plot: ``(label, x, y, group)`` points, one colour and legend entry per group (placed at
    matplotlib's ``legend`` location); no label covers another, a marker or the legend (`place_labels`)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    groups = list(dict.fromkeys(group for *_, group in points))
    for group, color in zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        chosen = [p for p in points if p[3] == group]
        ax.scatter([p[1] for p in chosen], [p[2] for p in chosen], color=color, s=_MARKER_AREA, label=group, zorder=3)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for use_log, axis, set_scale in ((logx, ax.xaxis, ax.set_xscale), (logy, ax.yaxis, ax.set_yscale)):
        if use_log:
            set_scale("log")
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ScalarFormatter())  # 1, 2, 5, 10 rather than 10^0, 10^1
            axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.08, y=0.15)  # room for the labels and the legend
    ax.legend(fontsize=7, loc=legend)
    fig.tight_layout()  # before the labels: they are placed in the final layout's pixels
    place_labels(ax, [(label, x, y) for label, x, y, _ in points])
    return save_figure(fig, path, dpi=120)


#: Scatter marker area (points^2) of ``plot_points``.
_MARKER_AREA = 40

#: Label positions tried in turn, as (dx, dy) offsets in points from the marker: beside it (right, then left; above,
#: below, level with it), then nudged further up or down in steps, then above or below it.
_NEAR = [(4, 3), (4, -3), (-4, 3), (-4, -3), (5, 0), (-5, 0)]
_NUDGED = [(dx, sign * (3 + 5 * step)) for step in range(1, 7) for dx in (4, -4) for sign in (1, -1)]
_LABEL_OFFSETS = _NEAR + _NUDGED + [(0, 6), (0, -6)]


def place_labels(ax: Any, points: Sequence[tuple[str, float, float]], *, fontsize: float = 7) -> list[Any]:
    """Annotate each ``(label, x, y)`` point at the first offset of a fixed list where its text overlaps no label
    placed before it, no other marker and not the legend, and stays inside the axes; a label moved away from its
    marker gets a thin leader line. Deterministic: the same points give the same figure. Call it after the layout
    is final (limits, scales, ``tight_layout``): the check is done in the drawn figure's pixels.
    """
    fig = ax.figure
    fig.canvas.draw()  # final limits, ticks and legend position
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend()
    if legend is not None:  # keep the legend where it is now: "best" would otherwise move it to dodge the labels
        legend.set_loc(tuple(ax.transAxes.inverted().transform(legend.get_window_extent(renderer).p0)))
    inside = ax.get_window_extent(renderer)
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    radius = (_MARKER_AREA ** 0.5 / 2 + 1) * fig.dpi / 72  # a marker's half-width in pixels, plus a little air
    markers = [ax.transData.transform((x, y)) for _, x, y in points]
    from matplotlib.transforms import Bbox

    marker_boxes = [Bbox.from_extents(mx - radius, my - radius, mx + radius, my + radius) for mx, my in markers]
    texts = []
    for i, (label, x, y) in enumerate(points):
        obstacles = taken + marker_boxes[:i] + marker_boxes[i + 1:]
        for offset in [*_LABEL_OFFSETS, None]:  # None: nowhere free, so the first position, as before
            text = _annotate(ax, label, (x, y), offset or _LABEL_OFFSETS[0], fontsize, leader=False)
            box = text.get_window_extent(renderer).padded(1)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if offset is None or (fits and not any(box.overlaps(other) for other in obstacles)):
                break
            text.remove()
        if offset is not None and offset not in _NEAR:  # the leader line is drawn, not weighed: it may cross
            text.remove()
            text = _annotate(ax, label, (x, y), offset, fontsize, leader=True)
        taken.append(box)
        texts.append(text)
    return texts


def _annotate(ax: Any, label: str, xy: tuple[float, float], offset: tuple[float, float], fontsize: float, *,
              leader: bool) -> Any:
    dx, dy = offset
    return ax.annotate(label, xy, xytext=offset, textcoords="offset points", fontsize=fontsize,
                       ha="left" if dx > 0 else "right" if dx < 0 else "center",
                       va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                       arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 4}
                       if leader else None)
