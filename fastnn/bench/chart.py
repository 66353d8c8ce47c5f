"""PNG chart of fastnn's speedups per op (matplotlib, Agg canvas; imported only when drawing)."""
from __future__ import annotations

import importlib.util
from typing import Dict, List, Optional, Sequence

_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
           "#CCB974", "#64B5CD"]


class ChartUnavailable(RuntimeError):
    """matplotlib is not importable here."""


def unavailable_reason() -> Optional[str]:
    if importlib.util.find_spec("matplotlib") is None:
        return "the chart needs matplotlib, which is not installed (pip install matplotlib)"
    return None


def _group_label(e) -> str:
    s = f"{e.shape} {e.dtype} {e.pass_}"
    return s if len(s) <= 48 else s[:45] + "..."


def write_chart(rows: Sequence, summary: Sequence, path: str, title: str = "fastnn speedups") -> str:
    """Top panel: per op and reference, the geometric-mean speedup with a min-max whisker.
    Below: one panel per op, a bar per (group, reference). Log x axis; the line at 1x is parity."""
    reason = unavailable_reason()
    if reason:
        raise ChartUnavailable(reason)
    # Figure + the Agg canvas directly: no pyplot, so no global backend state to switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    rows = [r for r in rows if r.speedup is not None]
    refs: List[str] = []
    for r in rows:
        if r.ref.impl not in refs:
            refs.append(r.ref.impl)
    color = {ref: _COLORS[i % len(_COLORS)] for i, ref in enumerate(refs)}

    ops: Dict[str, Dict[tuple, list]] = {}  # op -> group -> rows (first-seen order)
    for r in rows:
        f = r.fastnn
        ops.setdefault(f.op, {}).setdefault(f.key + (f.impl,), []).append(r)

    n_sum = max(1, len(ops))
    heights = [0.9 + 0.35 * n_sum] + [0.9 + 0.32 * len(g) * max(1.0, 0.45 * max(len(v) for v in g.values()))
                                      for g in ops.values()]
    fig = Figure(figsize=(11, min(sum(heights) + 0.8, 120)), dpi=100)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.6)
    fig.suptitle(title, fontsize=11)

    all_sp = [r.speedup for r in rows] or [1.0]
    lo = min(min(all_sp), 1.0) / 1.5
    hi = max(max(all_sp), 1.0) * 1.5

    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if lo <= t <= hi]

    def setup_axis(ax):
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", lw=0.8)
        ax.grid(axis="x", which="both", alpha=0.25)
        ax.tick_params(axis="y", labelsize=8)
        ax.tick_params(axis="x", labelsize=8)

    # summary panel
    ax = fig.add_subplot(gs[0])
    setup_axis(ax)
    ax.set_title("geometric mean per op (whiskers: min to max)", fontsize=9)
    by_op: Dict[str, list] = {}
    for s in summary:
        by_op.setdefault(s.op, []).append(s)
    ylabels = []
    for i, (op, ss) in enumerate(by_op.items()):
        ylabels.append(op)
        h = 0.8 / max(1, len(ss))
        for j, s in enumerate(ss):
            ref = s.ref.split(" (vs ")[0]
            y = i - 0.4 + h * (j + 0.5)
            # bars grow from parity (1x): right for faster, left for slower
            ax.barh(y, s.geomean - 1.0, left=1.0, height=h * 0.9, color=color.get(ref, "#888888"))
            ax.errorbar(s.geomean, y, xerr=[[max(0.0, s.geomean - s.min)], [max(0.0, s.max - s.geomean)]], fmt="none",
                        ecolor="black", elinewidth=0.8, capsize=2)
            ax.text(s.max * 1.04 if s.geomean >= 1 else s.min / 1.04, y, f"{s.geomean:.2f}×", va="center",
                    ha="left" if s.geomean >= 1 else "right", fontsize=7)
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.invert_yaxis()
    if not ylabels:
        ax.text(1.0, 0, "no group has both fastnn and a reference", ha="center")

    # per-op panels
    for k, (op, groups) in enumerate(ops.items()):
        ax = fig.add_subplot(gs[k + 1])
        setup_axis(ax)
        ax.set_title(op, fontsize=9, loc="left")
        labels = []
        for i, (_, rs) in enumerate(groups.items()):
            labels.append(_group_label(rs[0].fastnn) + ("" if rs[0].fastnn.impl == "fastnn"
                                                        else f" [{rs[0].fastnn.impl}]"))
            h = 0.8 / len(rs)
            for j, r in enumerate(rs):
                y = i - 0.4 + h * (j + 0.5)
                ax.barh(y, r.speedup - 1.0, left=1.0, height=h * 0.9, color=color[r.ref.impl])
                ax.text(r.speedup * (1.03 if r.speedup >= 1 else 0.97), y, f"{r.speedup:.2f}×", va="center",
                        ha="left" if r.speedup >= 1 else "right", fontsize=6)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
    fig.axes[-1].set_xlabel("speedup = reference time / fastnn time (log scale; > 1: fastnn faster)", fontsize=8)
    if refs:
        from matplotlib.patches import Patch
        fig.axes[0].legend(handles=[Patch(color=color[r], label=r) for r in refs], loc="upper left",
                           bbox_to_anchor=(1.01, 1.0), fontsize=8, title="reference", title_fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
