"""python -m fastnn.bench {report,peaks,merge,profile} ... (see docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastnn.bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("report", help="Markdown table + PNG chart from pytest-benchmark JSON")
    r.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json file(s); several are merged")
    r.add_argument("--out", default=None, help="output folder (default: the first JSON's folder)")
    r.add_argument("--name", default=None, help="output file stem (default: the first JSON's stem)")
    r.add_argument("--peaks", default=None,
                   help="peaks JSON from `python -m fastnn.bench peaks` (default: <stem>.peaks.json beside "
                        "the JSON, when it exists)")
    r.add_argument("--stat", default="median", choices=("median", "min", "mean"),
                   help="which per-benchmark statistic is compared (default: median)")
    r.add_argument("--no-chart", action="store_true", help="write only the Markdown")

    k = sub.add_parser("peaks", help="measure this device's copy bandwidth and matmul rate")
    k.add_argument("--out", default=None, help="write the JSON here (default: print it only)")
    k.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "all"))
    k.add_argument("--size-mb", type=float, default=None, help="copy size in MiB (cuda 1024, cpu 256)")
    k.add_argument("--n", type=int, default=None, help="matmul size n for n^3 (cuda 8192, cpu 2048)")
    k.add_argument("--reps", type=int, default=None, help="timed repetitions (cuda 20, cpu 5)")

    f = sub.add_parser("profile", help="host vs device time per step of the slow cases (fastnn.bench.profile)")
    f.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    f.add_argument("--small", action="store_true", help="tiny shapes (a smoke test, not a measurement)")
    f.add_argument("--only", nargs="+", default=None, help="case names (default: all)")
    f.add_argument("--reps", type=int, default=20, help="steps per measurement (default 20)")
    f.add_argument("--out", default=None, help="also write the Markdown report here")

    m = sub.add_parser("merge", help="concatenate pytest-benchmark JSON files into one")
    m.add_argument("json", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument("--commit", default=None, help="record this commit id in commit_info")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "report":
        from fastnn.bench.chart import ChartUnavailable
        from fastnn.bench.report import render_summary_text, write_report

        peaks = args.peaks
        if peaks is None:
            stem = args.name or os.path.splitext(os.path.basename(args.json[0]))[0]
            guess = os.path.join(os.path.dirname(os.path.abspath(args.json[0])), stem + ".peaks.json")
            peaks = guess if os.path.exists(guess) else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = write_report(args.json, out_dir=args.out, peaks_path=peaks, name=args.name,
                                   stat=args.stat, chart=not args.no_chart)
            except ChartUnavailable as e:
                print(f"fastnn.bench report: {e}", file=sys.stderr)
                return 3
            except (OSError, ValueError) as e:
                print(f"fastnn.bench report: {e}", file=sys.stderr)
                return 2
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        print(render_summary_text(out["summary"]))
        print(f"wrote {out['markdown']}" + (f" and {out['chart']}" if out["chart"] else "")
              + (f" (peaks: {peaks})" if peaks else " (no peaks file: no % of peak)"))
        return 0

    if args.cmd == "peaks":
        from fastnn.bench.peaks import format_peaks, measure_peaks
        try:
            peaks = measure_peaks(args.device, size_mb=args.size_mb, n=args.n, reps=args.reps)
        except (RuntimeError, ValueError) as e:
            print(f"fastnn.bench peaks: {e}", file=sys.stderr)
            return 2
        print(format_peaks(peaks))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(peaks, f, indent=1)
            print(f"wrote {args.out}")
        else:
            print(json.dumps(peaks, indent=1))
        return 0

    if args.cmd == "profile":
        import torch

        from fastnn.bench.profile import run
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            print("fastnn.bench profile: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
        try:
            _, text = run(device, small=args.small, only=args.only, reps=args.reps)
        except ValueError as e:
            print(f"fastnn.bench profile: {e}", file=sys.stderr)
            return 2
        print(text)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                fh.write(text)
            print(f"wrote {args.out}")
        return 0

    if args.cmd == "merge":
        from fastnn.bench.report import merge_results
        try:
            merged = merge_results(args.json, args.out, commit=args.commit)
        except (OSError, ValueError) as e:
            print(f"fastnn.bench merge: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}: {len(merged['benchmarks'])} benchmarks from {len(args.json)} file(s)")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
