"""fastnn.bench: the report on a synthetic pytest-benchmark JSON (values worked out by hand below),
merge, the CLI, the chart, and the peaks measurement (tiny sizes on the CPU; a CUDA case)."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from fastnn.bench import chart as chart_mod
from helpers import fastnn_home
from fastnn.bench import peaks as peaks_mod
from fastnn.bench.__main__ import main as bench_main
from fastnn.bench.report import build_rows, load_results, merge_results, summarize, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(op, shape, dtype, pass_, impl, device, median, bytes_=0, flops=0, peak_mem=None, minimum=None):
    ei = dict(op=op, shape=shape, dtype=dtype, pass_=pass_, impl=impl, device=device, bytes=bytes_, flops=flops)
    if peak_mem is not None:
        ei["peak_memory_bytes"] = peak_mem
    return {
        "group": f"{op} {shape} {dtype} {pass_} {device}", "name": f"test_{op}[{impl}]",
        "fullname": f"benchmarks/bench_{op}.py::test_{op}[{impl}-{shape}-{dtype}-{pass_}]",
        "params": {"impl": impl}, "extra_info": ei,
        # mean deliberately differs from median: the report must use the statistic it is asked for
        "stats": {"median": median, "min": minimum if minimum is not None else 0.9 * median,
                  "mean": 1.3 * median, "max": 2 * median, "rounds": 20},
    }


# Hand-worked expectations (peaks: cuda copy 3000 GB/s; matmul fp32 60, bf16 800 TFLOP/s; no cpu peaks)
#  conv A fp32 fwd:      fastnn 2 ms, eager 3 ms (1.5x), compile 2.5 ms (1.25x);
#                        1.5e9 B -> 750 GB/s = 25% mem; 1e11 FLOP -> 50 TFLOP/s = 83.33% of fp32 -> compute
#  conv B bf16 fwd+bwd:  fastnn 1 ms, eager 4 ms (4x), compile 0.5 ms (0.5x); 2e9 B -> 2000 GB/s = 66.67% mem;
#                        1.6e11 FLOP -> 160 TFLOP/s = 20% of bf16 -> mem; peak memory 100 vs 400 B -> 0.25x
#  cbam fp16 fwd:        fastnn 0.5 ms, fastnn[triton] 0.4 ms, timm 1 ms (2x, 2.5x); fp16 falls back to the
#                        bf16 matmul peak: 8e10 FLOP / 0.5 ms = 160 TFLOP/s = 20%; 1e9 B -> 2000 GB/s = 66.67%
#  drop_block:           one group fastnn only, one group reference only (no speedup)
#  stochastic_pool cpu:  fastnn 10 ms, eager 30 ms (3x); no cpu peaks -> no % of peak
SYNTH = [
    _bench("conv", "(8, 64, 28, 28)", "float32", "fwd", "fastnn", "cuda", 2e-3, 1.5e9, 1e11, minimum=1.8e-3),
    _bench("conv", "(8, 64, 28, 28)", "float32", "fwd", "eager", "cuda", 3e-3, minimum=2e-3),
    _bench("conv", "(8, 64, 28, 28)", "float32", "fwd", "compile", "cuda", 2.5e-3),
    _bench("conv", "(32, 64, 56, 56)", "bfloat16", "fwd+bwd", "fastnn", "cuda", 1e-3, 2e9, 1.6e11, peak_mem=100),
    _bench("conv", "(32, 64, 56, 56)", "bfloat16", "fwd+bwd", "eager", "cuda", 4e-3, peak_mem=400),
    _bench("conv", "(32, 64, 56, 56)", "bfloat16", "fwd+bwd", "compile", "cuda", 0.5e-3),
    _bench("cbam", "(8, 256, 28, 28)", "float16", "fwd", "fastnn", "cuda", 5e-4, 1e9, 8e10),
    _bench("cbam", "(8, 256, 28, 28)", "float16", "fwd", "fastnn[triton]", "cuda", 4e-4, 1e9, 8e10),
    _bench("cbam", "(8, 256, 28, 28)", "float16", "fwd", "timm", "cuda", 1e-3),
    _bench("drop_block", "(8, 256, 28, 28)", "float32", "fwd", "fastnn", "cuda", 1e-4, 1e8),
    _bench("drop_block", "(8, 512, 14, 14)", "float32", "fwd", "timm", "cuda", 2e-4),
    _bench("stochastic_pool", "(8, 128, 56, 56)", "float32", "fwd", "fastnn", "cpu", 1e-2, 1e7),
    _bench("stochastic_pool", "(8, 128, 56, 56)", "float32", "fwd", "eager", "cpu", 3e-2),
]
PEAKS = {"version": 1, "devices": {"cuda": {"name": "Fake GPU", "copy_gbps": 3000.0,
                                            "matmul_tflops": {"bfloat16": 800.0, "float32": 60.0}}}}


@pytest.fixture
def synth(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"machine_info": {"fastnn": {"device": "Fake GPU", "torch": "2.11.0"}},
                                "commit_info": {"id": "abc123"}, "datetime": "2026-11-22T00:00:00",
                                "benchmarks": SYNTH}))
    peaks = tmp_path / "peaks.json"
    peaks.write_text(json.dumps(PEAKS))
    return path, peaks


def _row(rows, op, dtype, ref, fimpl="fastnn"):
    found = [r for r in rows if r.any.op == op and r.any.dtype == dtype and (r.ref.impl if r.ref else None) == ref
             and (r.fastnn.impl if r.fastnn else None) == fimpl]
    assert len(found) == 1, (op, dtype, ref, fimpl, found)
    return found[0]


def test_speedups_rates_and_peaks(synth):
    path, _ = synth
    rows = build_rows(load_results(str(path)).entries, PEAKS)
    r = _row(rows, "conv", "float32", "eager")
    assert r.speedup == pytest.approx(1.5)
    assert r.fastnn.gbps == pytest.approx(750.0)
    assert r.fastnn.tflops == pytest.approx(50.0)
    assert r.pct_mem == pytest.approx(25.0)
    assert r.pct_flops == pytest.approx(100 * 50 / 60)
    assert r.pct_peak == (pytest.approx(100 * 50 / 60), "compute")
    assert r.mem_ratio is None
    assert _row(rows, "conv", "float32", "compile").speedup == pytest.approx(1.25)

    r = _row(rows, "conv", "bfloat16", "eager")
    assert r.speedup == pytest.approx(4.0)
    assert r.pct_mem == pytest.approx(200 / 3)
    assert r.pct_flops == pytest.approx(20.0)
    assert r.pct_peak[1] == "mem"
    assert r.mem_ratio == pytest.approx(0.25)
    assert _row(rows, "conv", "bfloat16", "compile").speedup == pytest.approx(0.5)

    # fp16 has no measured matmul peak: it uses bf16's
    assert _row(rows, "cbam", "float16", "timm").pct_flops == pytest.approx(20.0)
    assert _row(rows, "cbam", "float16", "timm").speedup == pytest.approx(2.0)
    assert _row(rows, "cbam", "float16", "timm", "fastnn[triton]").speedup == pytest.approx(2.5)

    # unpaired groups are kept, without a speedup
    drop = [r for r in rows if r.any.op == "drop_block"]
    assert len(drop) == 2 and all(r.speedup is None for r in drop)
    assert {(r.fastnn is None, r.ref is None) for r in drop} == {(False, True), (True, False)}

    # cpu rows: speedup yes, % of peak no (only cuda peaks given)
    r = _row(rows, "stochastic_pool", "float32", "eager")
    assert r.speedup == pytest.approx(3.0)
    assert r.fastnn.gbps == pytest.approx(1.0)
    assert r.pct_peak is None


def test_summary_per_op(synth):
    path, _ = synth
    summ = {(s.op, s.ref): s for s in summarize(build_rows(load_results(str(path)).entries))}
    s = summ[("conv", "eager")]
    assert (s.n, s.wins) == (2, 2)
    assert s.geomean == pytest.approx(math.sqrt(1.5 * 4.0))
    assert (s.min, s.max) == (pytest.approx(1.5), pytest.approx(4.0))
    assert "float32 fwd" in s.min_where
    s = summ[("conv", "compile")]
    assert s.geomean == pytest.approx(math.sqrt(1.25 * 0.5))
    assert (s.min, s.wins) == (pytest.approx(0.5), 1)
    assert "bfloat16 fwd+bwd" in s.min_where
    assert summ[("cbam", "timm")].geomean == pytest.approx(2.0)
    assert summ[("cbam", "timm (vs fastnn[triton])")].geomean == pytest.approx(2.5)
    assert not any(op == "drop_block" for op, _ in summ)


def test_stat_choice(synth):
    path, _ = synth
    rows = build_rows(load_results(str(path), stat="min").entries)
    assert _row(rows, "conv", "float32", "eager").speedup == pytest.approx(2e-3 / 1.8e-3)
    rows = build_rows(load_results(str(path), stat="mean").entries)
    assert _row(rows, "conv", "bfloat16", "eager").speedup == pytest.approx(4.0)  # both means are 1.3x
    with pytest.raises(ValueError, match="stat="):
        load_results(str(path), stat="p99")


def test_markdown_and_png(synth, tmp_path):
    pytest.importorskip("matplotlib")
    path, peaks = synth
    out = write_report(str(path), out_dir=str(tmp_path / "out"), peaks_path=str(peaks))
    md = open(out["markdown"]).read()
    assert out["markdown"].endswith("run.md") and out["chart"].endswith("run.png")
    for s in ("abc123", "Fake GPU", "| conv | (8, 64, 28, 28) | float32 | fwd | cuda | 2 ms | eager | 3 ms | 1.50× "
              "| 750 GB/s · 50 TFLOP/s | 83% (compute) |", "| 4.00× | 2000 GB/s · 160 TFLOP/s | 67% (mem) | 0.25× |", "| 1 GB/s | — |",
              "| conv | cuda | eager | 2 | 2.45× | 1.50× ((8, 64, 28, 28) float32 fwd) | 4.00× | 2/2 |",
              "(vs fastnn[triton])", "missing", "![speedups per op](run.png)"):
        assert s in md, s
    with open(out["chart"], "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out["chart"]) > 10_000


def test_missing_matplotlib_still_writes_markdown(synth, tmp_path, monkeypatch):
    path, peaks = synth
    monkeypatch.setattr(chart_mod, "unavailable_reason", lambda: "the chart needs matplotlib")
    with pytest.raises(chart_mod.ChartUnavailable, match="matplotlib.*--no-chart"):
        write_report(str(path), out_dir=str(tmp_path), peaks_path=str(peaks))
    md = (tmp_path / "run.md").read_text()
    assert "1.50×" in md and ".png" not in md
    assert not (tmp_path / "run.png").exists()
    # and the CLI says so with its own exit code
    assert bench_main(["report", str(path), "--out", str(tmp_path)]) == 3
    assert bench_main(["report", str(path), "--out", str(tmp_path), "--no-chart"]) == 0


def test_cli_report_finds_peaks_beside_json(synth, tmp_path, capsys):
    path, peaks = synth
    os.replace(peaks, tmp_path / "run.peaks.json")
    assert bench_main(["report", str(path), "--no-chart"]) == 0
    assert "83% (compute)" in (tmp_path / "run.md").read_text()
    printed = capsys.readouterr().out
    assert "conv" in printed and "2.45×" in printed


def test_cli_errors_are_clear(tmp_path, capsys):
    assert bench_main(["report", str(tmp_path / "nope.json"), "--no-chart"]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    assert bench_main(["report", str(bad), "--no-chart"]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err


def test_merge(synth, tmp_path):
    path, _ = synth
    data = json.loads(path.read_text())
    a, b, broken = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "broken.json"
    a.write_text(json.dumps(dict(data, benchmarks=SYNTH[:5])))
    b.write_text(json.dumps(dict(data, benchmarks=SYNTH[5:])))
    broken.write_text('{"benchmarks": [')  # a run killed while writing
    with pytest.warns(UserWarning, match="skipping"):
        merged = merge_results([str(a), str(broken), str(b)], str(tmp_path / "m.json"), commit="deadbeef")
    assert len(merged["benchmarks"]) == len(SYNTH)
    res = load_results(str(tmp_path / "m.json"))
    assert res.commit_info["id"] == "deadbeef" and len(res.entries) == len(SYNTH)
    # several JSONs given to the report at once: same rows as the merged file
    rows = build_rows(load_results([str(a), str(b)]).entries)
    assert _row(rows, "conv", "bfloat16", "compile").speedup == pytest.approx(0.5)


def test_real_pytest_benchmark_json(tmp_path):
    """bench_utils.run_benchmark -> pytest-benchmark JSON -> report: the schema agrees end to end."""
    pytest.importorskip("pytest_benchmark")
    bench = tmp_path / "bench_tiny.py"
    bench.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
        import pytest, torch
        from bench_utils import run_benchmark

        @pytest.mark.parametrize("impl", ["fastnn", "eager"])
        def test_tiny(benchmark, impl):
            x = torch.ones(4096)
            fn = (lambda: x * 2) if impl == "fastnn" else (lambda: x + x)
            run_benchmark(benchmark, fn, device="cpu", op="tiny", shape=tuple(x.shape), dtype=x.dtype,
                          pass_="fwd", impl=impl, bytes_moved=2 * x.numel() * 4, flops=x.numel(), rounds=3)
    """))
    out = tmp_path / "tiny.json"
    p = subprocess.run([sys.executable, "-m", "pytest", str(bench), "-q", "-p", "no:cacheprovider",
                        f"--benchmark-json={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    raw = {b["extra_info"]["impl"]: b["stats"]["median"] for b in json.loads(out.read_text())["benchmarks"]}
    rows = build_rows(load_results(str(out)).entries)
    assert len(rows) == 1
    r = rows[0]
    assert (r.fastnn.op, r.fastnn.shape, r.fastnn.dtype, r.ref.impl) == ("tiny", "(4096,)", "float32", "eager")
    assert r.speedup == pytest.approx(raw["eager"] / raw["fastnn"])
    assert r.fastnn.gbps == pytest.approx(2 * 4096 * 4 / raw["fastnn"] / 1e9)


def test_bench_package_is_light():
    """Importing fastnn.bench pulls in neither matplotlib nor a model zoo."""
    code = ("import sys, fastnn.bench, fastnn.bench.peaks, fastnn.bench.chart; "
            "bad = [m for m in ('matplotlib', 'timm', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=fastnn_home(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------------------------------ peaks
def test_peaks_cpu_tiny():
    pk = peaks_mod.measure_peaks("cpu", size_mb=1, n=32, reps=2)
    d = pk["devices"]["cpu"]
    assert set(pk["devices"]) == {"cpu"}
    assert d["copy_bytes"] == 2**20
    assert 0 < d["copy_gbps"] < 1e4 and d["copy_gbps"] >= d["copy_gbps_median"]
    assert set(d["matmul_tflops"]) == {"float32"} and d["matmul_tflops"]["float32"] > 0
    assert d["matmul_n"] == 32 and d["threads"] >= 1
    json.dumps(pk)  # serializable


def test_peaks_arithmetic(monkeypatch):
    """Best and median rates from known times: copy counts read + write, matmul 2 n^3."""
    monkeypatch.setattr(peaks_mod, "_time_cpu", lambda fn, reps, warmup: [2.0, 1.0, 4.0])
    d = peaks_mod.measure_device("cpu", size_mb=1, n=16, reps=3)
    assert d["copy_gbps"] == pytest.approx(2 * 2**20 / 1.0 / 1e9)
    assert d["copy_gbps_median"] == pytest.approx(2 * 2**20 / 2.0 / 1e9)
    assert d["matmul_tflops"]["float32"] == pytest.approx(2 * 16**3 / 1.0 / 1e12)
    assert d["matmul_tflops_median"]["float32"] == pytest.approx(2 * 16**3 / 2.0 / 1e12)


def test_peaks_cli(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert bench_main(["peaks", "--device", "cpu", "--size-mb", "1", "--n", "16", "--reps", "1",
                       "--out", str(out)]) == 0
    assert json.loads(out.read_text())["devices"]["cpu"]["copy_gbps"] > 0
    with pytest.raises(ValueError, match="positive"):
        peaks_mod.measure_device("cpu", size_mb=1, n=0)


@pytest.mark.cuda
def test_peaks_cuda_plausible():
    d = peaks_mod.measure_peaks("cuda", size_mb=256, n=2048, reps=5)["devices"]["cuda"]
    # an H100/H200 copies ~3-4.5 TB/s; a wrong timer (launch time only) gives absurd numbers
    assert 100 < d["copy_gbps"] < 20_000
    mm = d["matmul_tflops"]
    assert set(mm) == {"bfloat16", "float16", "float32", "tf32"}
    assert 1 < mm["bfloat16"] < 5_000 and 0.1 < mm["float32"] < 500
    assert mm["bfloat16"] > mm["float32"]


# ------------------------------------------------------------------------------------------ bench_utils
def _bench_utils():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_utils
    finally:
        sys.path.pop(0)
    return bench_utils


class _FakeBenchmark:
    """Records what run_benchmark asks pytest-benchmark for, and runs it like pedantic does."""
    disabled = False

    def __init__(self):
        self.extra_info, self.group, self.calls = {}, None, None

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        self.calls = dict(rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)
        for _ in range((warmup_rounds + rounds) * iterations):
            out = fn()
        return out


def test_cuda_timing_batches_calls(monkeypatch):
    """On CUDA, one synchronize per `iterations` calls: a timed round ends with the device idle."""
    bu = _bench_utils()
    syncs, calls = [], []
    monkeypatch.setattr(bu.torch.cuda, "synchronize", lambda: syncs.append(len(calls)))
    run = bu.sync_call(lambda: calls.append(1), "cuda", every=3)
    assert syncs == [0]  # before the first call
    for _ in range(6):
        run()
    assert syncs == [0, 3, 6]

    syncs.clear(), calls.clear()
    fb = _FakeBenchmark()
    bu.run_benchmark(fb, lambda: calls.append(1), device="cuda", op="x", shape=(4,), dtype="torch.float16",
                     pass_="fwd", impl="eager", bytes_moved=16, iterations=4, rounds=2, warmup=1)
    assert fb.calls == dict(rounds=2, iterations=4, warmup_rounds=1)
    assert fb.extra_info == dict(op="x", shape="(4,)", dtype="float16", pass_="fwd", impl="eager", device="cuda",
                                 bytes=16, flops=0, calls_per_sync=4)
    assert fb.group == "x (4,) float16 fwd cuda"
    # every round of 4 calls ends in a synchronize (plus the one before and the one after)
    assert syncs == [0, 4, 8, 12, 12]

    # calibration: calls for >= ~1 ms per round, capped
    monkeypatch.setattr(bu, "_calls_per_sync", lambda fn: 7)
    fb = _FakeBenchmark()
    bu.run_benchmark(fb, lambda: None, device="cuda", op="x", shape=(4,), dtype="float32", pass_="fwd",
                     impl="fastnn")
    assert fb.calls["iterations"] == 7 and fb.calls["rounds"] == 20
    fb = _FakeBenchmark()
    fb.disabled = True  # --benchmark-disable: one untimed call, no calibration
    bu.run_benchmark(fb, lambda: None, device="cuda", op="x", shape=(4,), dtype="float32", pass_="fwd",
                     impl="fastnn")
    assert fb.calls["iterations"] == 1


def test_cpu_timing_unchanged():
    bu = _bench_utils()
    fb = _FakeBenchmark()
    bu.run_benchmark(fb, lambda: None, device="cpu", op="x", shape=(4,), dtype="float32", pass_="fwd",
                     impl="fastnn", peak_memory=123)
    assert fb.calls == dict(rounds=5, iterations=1, warmup_rounds=1)
    assert fb.extra_info["peak_memory_bytes"] == 123 and "calls_per_sync" not in fb.extra_info


def test_profile_cli_small_cpu(tmp_path, capsys):
    """python -m fastnn.bench profile: every requested case, fastnn and its references, with times."""
    pytest.importorskip("fastnn._C")
    out = tmp_path / "profile.md"
    rc = bench_main(["profile", "--device", "cpu", "--small", "--reps", "2", "--only", "bn_relu_train",
                     "drop_block_fwd_bwd", "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    got = {(r[0].strip(), r[2].strip()) for r in rows}
    assert {("bn_relu_train", "fastnn"), ("bn_relu_train", "eager"), ("drop_block_fwd_bwd", "fastnn"),
            ("drop_block_fwd_bwd", "x*mask")} <= got
    assert all(r[0].strip() in ("bn_relu_train", "drop_block_fwd_bwd") for r in rows)
    for r in rows:
        wall, host = float(r[3]), float(r[4])
        assert 0 < host <= wall * 1.5 + 0.05
    assert "### bn_relu_train" in text and "fastnn::bn_relu" in text  # the fastnn step's op table


def test_profile_cli_rejects_unknown_case(capsys):
    assert bench_main(["profile", "--device", "cpu", "--small", "--only", "no_such_case"]) == 2
    assert "no_such_case" in capsys.readouterr().err
