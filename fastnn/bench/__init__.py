"""Benchmark tooling: `python -m fastnn.bench report|peaks|merge`.

    python -m fastnn.bench peaks --out peaks.json          # this device's copy / matmul ceilings
    pytest benchmarks --benchmark-only --benchmark-json=run.json
    python -m fastnn.bench report run.json --peaks peaks.json   # run.md + run.png

The report needs only the standard library (matplotlib for the chart, imported when the
chart is drawn); `peaks` imports torch when it measures. Nothing here imports fastnn's ops.
"""
from fastnn.bench.report import (  # noqa: F401
    Entry, Row, build_rows, load_results, merge_results, render_markdown, summarize, write_report,
)
