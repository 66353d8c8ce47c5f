"""Turns pytest-benchmark JSON into a Markdown table (and a chart, see chart.py).

Standard library only, so the report can be written anywhere the JSON can be read.

Input: the benchmarks written by benchmarks/bench_utils.run_benchmark, whose extra_info holds
op, shape, dtype, pass_, impl ("fastnn" or the reference's name), device, bytes, flops and
optionally peak_memory_bytes. Benchmarks of one (op, shape, dtype, pass, device) form a group;
fastnn is compared with every reference of its group, so each speedup comes from one run.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

STATS = ("median", "min", "mean")


def is_fastnn(impl: str) -> bool:
    """"fastnn", or a variant of it such as "fastnn[triton]" / "fastnn-cuda"."""
    return impl == "fastnn" or impl.startswith(("fastnn[", "fastnn-", "fastnn:", "fastnn_"))


@dataclass
class Entry:
    """One benchmark: one implementation timed on one group."""
    op: str
    shape: str
    dtype: str
    pass_: str
    impl: str
    device: str
    time_s: float               # the chosen statistic (median by default), seconds per call
    bytes: int = 0
    flops: int = 0
    peak_memory_bytes: Optional[int] = None
    name: str = ""
    rounds: int = 0

    @property
    def key(self) -> Tuple[str, str, str, str, str]:
        return (self.op, self.shape, self.dtype, self.pass_, self.device)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def gbps(self) -> Optional[float]:
        return self.bytes / self.time_s / 1e9 if self.bytes > 0 else None

    @property
    def tflops(self) -> Optional[float]:
        return self.flops / self.time_s / 1e12 if self.flops > 0 else None


@dataclass
class Row:
    """fastnn against one reference in one group (either side may be missing)."""
    fastnn: Optional[Entry]
    ref: Optional[Entry]
    pct_mem: Optional[float] = None      # fastnn's GB/s as % of the measured copy bandwidth
    pct_flops: Optional[float] = None    # fastnn's TFLOP/s as % of the measured matmul rate

    @property
    def any(self) -> Entry:
        return self.fastnn or self.ref

    @property
    def speedup(self) -> Optional[float]:
        """reference time / fastnn time: > 1 means fastnn is faster."""
        if self.fastnn is None or self.ref is None:
            return None
        return self.ref.time_s / self.fastnn.time_s

    @property
    def mem_ratio(self) -> Optional[float]:
        """fastnn's peak memory / the reference's, when both were recorded (< 1: fastnn uses less)."""
        if self.fastnn is None or self.ref is None:
            return None
        a, b = self.fastnn.peak_memory_bytes, self.ref.peak_memory_bytes
        if a is None or b is None or b <= 0:
            return None
        return a / b

    @property
    def pct_peak(self) -> Optional[Tuple[float, str]]:
        """Roofline fraction: the larger of the memory and compute fractions, and which it is."""
        cands = [(p, k) for p, k in ((self.pct_mem, "mem"), (self.pct_flops, "compute")) if p is not None]
        return max(cands) if cands else None


@dataclass
class Results:
    entries: List[Entry]
    machine_info: dict = field(default_factory=dict)
    commit_info: dict = field(default_factory=dict)
    datetime: str = ""
    sources: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- loading
def _entry(b: dict, stat: str) -> Optional[Entry]:
    ei = b.get("extra_info") or {}
    st = b.get("stats") or {}
    name = b.get("fullname") or b.get("name") or "?"
    t = st.get(stat)
    if not isinstance(t, (int, float)) or not t > 0 or not math.isfinite(t):
        warnings.warn(f"{name}: no usable '{stat}' time in its stats; left out of the report")
        return None
    if "impl" not in ei or "op" not in ei:
        # not written by bench_utils.run_benchmark: keep it, grouped by its pytest-benchmark group
        warnings.warn(f"{name}: extra_info has no op/impl (not from bench_utils.run_benchmark); "
                      "grouped by its pytest-benchmark group")
    pm = ei.get("peak_memory_bytes")
    return Entry(
        op=str(ei.get("op", b.get("group") or "?")),
        shape=str(ei.get("shape", "")),
        dtype=str(ei.get("dtype", "")).replace("torch.", ""),
        pass_=str(ei.get("pass_", ei.get("pass", ""))),
        impl=str(ei.get("impl", b.get("param") or b.get("name") or "?")),
        device=str(ei.get("device", "")),
        time_s=float(t),
        bytes=int(ei.get("bytes") or 0),
        flops=int(ei.get("flops") or 0),
        peak_memory_bytes=int(pm) if pm is not None else None,
        name=name,
        rounds=int(st.get("rounds") or 0),
    )


def load_results(paths: Sequence[str] | str, stat: str = "median") -> Results:
    """Reads one or more pytest-benchmark JSON files (machine/commit info from the first)."""
    if stat not in STATS:
        raise ValueError(f"stat={stat!r}: use one of {', '.join(STATS)}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no benchmark JSON given")
    res = Results(entries=[])
    seen = {}
    for p in paths:
        try:
            with open(p) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: no such file (write it with pytest --benchmark-json={p})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e}); is the run that wrote it complete?") from None
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise ValueError(f"{p}: not a pytest-benchmark JSON (no 'benchmarks' list)")
        if not res.sources:
            res.machine_info = data.get("machine_info") or {}
            res.commit_info = data.get("commit_info") or {}
            res.datetime = data.get("datetime") or ""
        res.sources.append(str(p))
        for b in data["benchmarks"]:
            e = _entry(b, stat)
            if e is None:
                continue
            k = e.key + (e.impl,)
            if k in seen:
                warnings.warn(f"{e.name}: a second result for {k} (first: {seen[k]}); keeping the first")
                continue
            seen[k] = e.name
            res.entries.append(e)
    return res


def merge_results(paths: Sequence[str], out: str, commit: Optional[str] = None) -> dict:
    """Concatenates pytest-benchmark JSON files (e.g. one per benchmark file) into one."""
    merged = None
    for p in paths:
        try:
            with open(p) as f:
                data = json.load(f)
            if not isinstance(data.get("benchmarks"), list):
                raise ValueError("no 'benchmarks' list")
        except (OSError, ValueError, AttributeError) as e:
            # e.g. a run killed while writing: keep the others
            warnings.warn(f"merge: skipping {p}: {e}")
            continue
        if merged is None:
            merged = data
        else:
            merged["benchmarks"].extend(data.get("benchmarks", []))
    if merged is None:
        raise ValueError("merge: no readable pytest-benchmark JSON among the inputs")
    if commit:
        ci = merged.setdefault("commit_info", {})
        if ci.get("id") != commit:
            ci.clear()
            ci.update({"id": commit, "source": "FASTNN_COMMIT"})
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)
    return merged


# ---------------------------------------------------------------------------------------- peaks
_FLOP_DTYPE_FALLBACK = {"float16": ("float16", "bfloat16"), "bfloat16": ("bfloat16", "float16"),
                        "half": ("float16", "bfloat16"), "float": ("float32",)}


def peak_for(peaks: Optional[dict], device_type: str) -> Optional[dict]:
    if not peaks:
        return None
    return (peaks.get("devices") or {}).get(device_type)


def matmul_peak(dev_peaks: Optional[dict], dtype: str) -> Optional[Tuple[float, str]]:
    """The measured matmul TFLOP/s for a benchmark's dtype, and which dtype it came from."""
    if not dev_peaks:
        return None
    mm = dev_peaks.get("matmul_tflops") or {}
    for d in _FLOP_DTYPE_FALLBACK.get(dtype, (dtype,)):
        if mm.get(d):
            return float(mm[d]), d
    return None


def load_peaks(path: Optional[str]) -> Optional[dict]:
    if not path:
        return None
    with open(path) as f:
        peaks = json.load(f)
    if not isinstance(peaks, dict) or not isinstance(peaks.get("devices"), dict):
        raise ValueError(f"{path}: not a peaks file (write one with `python -m fastnn.bench peaks --out {path}`)")
    return peaks


# ---------------------------------------------------------------------------------------- rows
def build_rows(entries: Iterable[Entry], peaks: Optional[dict] = None) -> List[Row]:
    """One row per (fastnn variant, reference) in each group, groups in first-seen order."""
    groups: Dict[tuple, List[Entry]] = {}
    for e in entries:
        groups.setdefault(e.key, []).append(e)
    rows: List[Row] = []
    for key, es in groups.items():
        fs = [e for e in es if is_fastnn(e.impl)]
        refs = [e for e in es if not is_fastnn(e.impl)]
        pairs = [(f, r) for f in fs for r in refs] or [(f, None) for f in fs] or [(None, r) for r in refs]
        for f, r in pairs:
            row = Row(f, r)
            dp = peak_for(peaks, f.device_type) if f is not None else None
            if f is not None and dp:
                if f.gbps is not None and dp.get("copy_gbps"):
                    row.pct_mem = 100.0 * f.gbps / float(dp["copy_gbps"])
                mp = matmul_peak(dp, f.dtype)
                if f.tflops is not None and mp:
                    row.pct_flops = 100.0 * f.tflops / mp[0]
            rows.append(row)
    return rows


@dataclass
class Summary:
    op: str
    ref: str
    device: str
    n: int
    geomean: float
    min: float
    min_where: str
    max: float
    wins: int          # groups where fastnn is faster


def summarize(rows: Iterable[Row]) -> List[Summary]:
    """Per op and reference: geometric mean, min and max of the speedups."""
    acc: Dict[tuple, List[Row]] = {}
    for r in rows:
        if r.speedup is not None:
            acc.setdefault((r.fastnn.op, r.ref.impl, r.fastnn.device, r.fastnn.impl), []).append(r)
    out = []
    for (op, ref, dev, fimpl), rs in acc.items():
        sp = [r.speedup for r in rs]
        worst = min(rs, key=lambda r: r.speedup)
        label = ref if fimpl == "fastnn" else f"{ref} (vs {fimpl})"
        out.append(Summary(op=op, ref=label, device=dev, n=len(sp),
                           geomean=math.exp(sum(math.log(s) for s in sp) / len(sp)),
                           min=worst.speedup, min_where=f"{worst.fastnn.shape} {worst.fastnn.dtype} {worst.fastnn.pass_}",
                           max=max(sp), wins=sum(s > 1.0 for s in sp)))
    return out


# ---------------------------------------------------------------------------------------- formatting
def fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


def fmt_x(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2f}×"


def fmt_num(x: float) -> str:
    """3 significant digits, never in exponent form for the magnitudes seen here."""
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.2g}"


def fmt_flops(tflops: float) -> str:
    """TFLOP/s, or GFLOP/s below 1 TFLOP/s (CPU rates)."""
    return f"{fmt_num(tflops)} TFLOP/s" if tflops >= 1 else f"{fmt_num(tflops * 1e3)} GFLOP/s"


def fmt_rate(e: Optional[Entry]) -> str:
    if e is None:
        return "—"
    parts = []
    if e.gbps is not None:
        parts.append(f"{fmt_num(e.gbps)} GB/s")
    if e.tflops is not None:
        parts.append(fmt_flops(e.tflops))
    return " · ".join(parts) or "—"


def fmt_pct(row: Row) -> str:
    p = row.pct_peak
    return "—" if p is None else f"{p[0]:.0f}% ({p[1]})"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return lines


def describe_run(res: Results) -> Dict[str, str]:
    mi = res.machine_info or {}
    fx = mi.get("fastnn") or {}
    commit = (res.commit_info or {}).get("id") or fx.get("commit") or "unknown"
    if (res.commit_info or {}).get("dirty"):
        commit += " (dirty)"
    device = fx.get("device") or (mi.get("cpu") or {}).get("brand_raw") or mi.get("machine") or "?"
    sw = []
    for k, label in (("torch", "torch"), ("cuda", "CUDA"), ("triton", "triton")):
        if fx.get(k):
            sw.append(f"{label} {fx[k]}")
    if mi.get("python_version"):
        sw.append(f"Python {mi['python_version']}")
    return {"commit": commit, "device": device, "software": ", ".join(sw), "date": res.datetime or "?",
            "extension": fx.get("extension", "")}


def render_markdown(res: Results, rows: List[Row], summary: List[Summary], peaks: Optional[dict] = None,
                    stat: str = "median", chart_name: Optional[str] = None) -> str:
    d = describe_run(res)
    out = ["# fastnn benchmarks", ""]
    out.append(f"- **device:** {d['device']}")
    out.append(f"- **commit:** `{d['commit']}`")
    out.append(f"- **date:** {d['date']}")
    if d["software"]:
        out.append(f"- **software:** {d['software']}")
    if d["extension"]:
        out.append(f"- **fastnn extension:** {d['extension']}")
    out.append(f"- **times:** the {stat} of each benchmark's rounds; speedup = reference time / fastnn time "
               "in the same run (> 1: fastnn is faster)")
    devs = sorted({r.any.device_type for r in rows})
    for dv in devs:
        dp = peak_for(peaks, dv)
        if dp:
            mm = ", ".join(f"{k} {fmt_flops(v)}" for k, v in (dp.get("matmul_tflops") or {}).items() if v)
            size = f" {dp['matmul_n']}³" if dp.get("matmul_n") else ""
            out.append(f"- **measured peaks ({dv}, {dp.get('name', '?')}):** copy {fmt_num(dp.get('copy_gbps', 0))} GB/s "
                       f"(read + write); matmul{size}: {mm or '—'}")
        else:
            out.append(f"- **measured peaks ({dv}):** none given, so no % of peak (see `python -m fastnn.bench peaks`)")
    out.append("")
    if chart_name:
        out += [f"![speedups per op]({chart_name})", ""]

    out += ["## Summary per op", ""]
    if summary:
        multi_dev = len({s.device for s in summary}) > 1
        hdr = ["op"] + (["device"] if multi_dev else []) + ["reference", "groups", "geomean speedup",
                                                            "min (where)", "max", "fastnn faster"]
        body = [[s.op] + ([s.device] if multi_dev else []) +
                [s.ref, str(s.n), fmt_x(s.geomean), f"{fmt_x(s.min)} ({s.min_where})", fmt_x(s.max),
                 f"{s.wins}/{s.n}"] for s in summary]
        out += _md_table(hdr, body)
    else:
        out.append("No group has both a fastnn and a reference result.")
    out.append("")

    out += ["## All results", ""]
    multi_dev = len({r.any.device for r in rows}) > 1
    any_mem = any(r.mem_ratio is not None for r in rows)
    hdr = ["op", "shape", "dtype", "pass"] + (["device"] if multi_dev else []) + \
          ["fastnn", "reference", "ref time", "speedup", "fastnn achieved", "% of peak"] + \
          (["peak mem fastnn/ref"] if any_mem else [])
    body = []
    for r in rows:
        a = r.any
        fcell = fmt_time(r.fastnn.time_s) if r.fastnn else "missing"
        if r.fastnn and r.fastnn.impl != "fastnn":
            fcell += f" ({r.fastnn.impl})"
        body.append([a.op, a.shape, a.dtype, a.pass_] + ([a.device] if multi_dev else []) +
                    [fcell, r.ref.impl if r.ref else "—", fmt_time(r.ref.time_s) if r.ref else "—",
                     fmt_x(r.speedup), fmt_rate(r.fastnn), fmt_pct(r)] +
                    ([fmt_x(r.mem_ratio)] if any_mem else []))
    out += _md_table(hdr, body)
    out += ["", "How to read: *fastnn achieved* is the bytes the op must move and its FLOPs (recorded by each "
            "benchmark) over fastnn's time. *% of peak* is the larger of GB/s over the measured copy bandwidth "
            "and TFLOP/s over the measured matmul rate for that dtype (the roofline fraction), tagged with "
            "which one it is. *peak mem* < 1× means fastnn allocated less than the reference at its peak.", ""]
    return "\n".join(out)


def render_summary_text(summary: List[Summary]) -> str:
    """A plain-text summary for terminals and logs."""
    if not summary:
        return "(no group has both a fastnn and a reference result)"
    rows = [("op", "device", "reference", "n", "geomean", "min", "max", "faster")]
    rows += [(s.op, s.device, s.ref, str(s.n), fmt_x(s.geomean), fmt_x(s.min), fmt_x(s.max), f"{s.wins}/{s.n}")
             for s in summary]
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)


def write_report(json_paths: Sequence[str] | str, out_dir: Optional[str] = None, peaks_path: Optional[str] = None,
                 name: Optional[str] = None, stat: str = "median", chart: bool = True) -> Dict[str, object]:
    """Writes <name>.md (and <name>.png unless chart=False). Returns paths, rows and summary.

    The Markdown is written before the chart is drawn, so a missing matplotlib (ChartUnavailable)
    still leaves the table on disk."""
    if isinstance(json_paths, (str, os.PathLike)):
        json_paths = [json_paths]
    first = str(json_paths[0])
    name = name or os.path.splitext(os.path.basename(first))[0]
    out_dir = out_dir or os.path.dirname(os.path.abspath(first))
    os.makedirs(out_dir, exist_ok=True)
    res = load_results(json_paths, stat=stat)
    peaks = load_peaks(peaks_path)
    rows = build_rows(res.entries, peaks)
    summary = summarize(rows)
    md_path = os.path.join(out_dir, name + ".md")
    png_path = os.path.join(out_dir, name + ".png")
    from fastnn.bench import chart as _chart
    missing = _chart.unavailable_reason() if chart else None
    md = render_markdown(res, rows, summary, peaks, stat=stat,
                         chart_name=os.path.basename(png_path) if chart and not missing else None)
    with open(md_path, "w") as f:
        f.write(md)
    result = {"markdown": md_path, "chart": None, "rows": rows, "summary": summary, "results": res}
    if missing:
        raise _chart.ChartUnavailable(f"{missing}; the table was written to {md_path} (without the chart). "
                                      "Install matplotlib, or pass --no-chart")
    if chart:
        write_chart = _chart.write_chart
        d = describe_run(res)
        write_chart(rows, summary, png_path, title=f"fastnn speedup vs references — {d['device']} @ {d['commit'][:12]}")
        result["chart"] = png_path
    return result
