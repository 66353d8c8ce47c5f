"""DropBlock benchmarks: fastnn vs timm's drop_block_2d, forward and forward+backward, with
`x*mask` (a multiply by a precomputed float mask each way) as the floor in the same group.

Default run:
  cuda: (32, 256, 56, 56) block 7 and (32, 1024, 14, 14) block 5, float32 (+ the CPU shape)
  cpu:  (8, 256, 28, 28) block 7, float32
--fastnn-full adds bfloat16/float16 on CUDA, coupled channels, and timm under torch.compile.
On the shared 2-core CI machine, OpenMP regions stall while another process holds the second
core; compare runs with OMP_NUM_THREADS=1 as well (ratios there are stable).

Both sides use per-channel masks (couple_channels=False, fastnn's default) unless the group
says coupled. bytes = the traffic an ideal kernel needs: the tensor read and written once
per pass, plus the 1-bit mask written by the forward / read by the backward.
"""
import pytest
import torch
from bench_utils import peak_memory_of, run_benchmark

import fastnn
import fastnn.functional as F
from fastnn import reference as R

timm_drop = pytest.importorskip("timm.layers.drop")

GPU_CASES = [((32, 256, 56, 56), 7), ((32, 1024, 14, 14), 5)]
CPU_CASES = [((8, 256, 28, 28), 7)]
P = 0.1


def _cases(device, full):
    cases = (GPU_CASES + CPU_CASES) if str(device).startswith("cuda") else list(CPU_CASES)
    if full and not str(device).startswith("cuda"):
        cases += [((8, 512, 14, 14), 5)]
    return cases


def _dtypes(device, full):
    if str(device).startswith("cuda") and full:
        return [torch.float32, torch.bfloat16, torch.float16]
    return [torch.float32]




def _bytes(shape, dtype, pass_):
    n = 1
    for s in shape:
        n *= s
    elt = torch.empty((), dtype=dtype).element_size()
    one = 2 * n * elt + n // 8
    return one if pass_ == "fwd" else 2 * one


def _check(x, block, couple):
    """fastnn equals the reference given the same seeds, and the reference is timm."""
    g = torch.Generator(device=x.device)
    s = F.drop_block_seed_mask(x, P, block, couple_channels=couple, generator=g.manual_seed(0))
    out = F.drop_block2d(x, P, block, couple_channels=couple, generator=g.manual_seed(0))
    ref = R.drop_block_from_seeds(x, s.to(x.dtype), R.drop_block_clip((block, block), x.shape[2:]))
    assert torch.equal(out, ref), "fastnn output differs from the reference with the same seed mask"
    state = torch.random.get_rng_state() if not x.is_cuda else torch.cuda.get_rng_state(x.device)
    torch.manual_seed(0)
    a = timm_drop.drop_block_2d(x, P, block, couple_channels=couple)
    torch.manual_seed(0)
    b = R.drop_block(x, P, block, couple_channels=couple)
    if x.dtype == torch.float32:
        # the same blocks; the scale can differ by an ulp past 2^24 units (timm counts in float32)
        assert torch.equal(a == 0, b == 0), "timm drops other blocks than fastnn.reference"
        assert torch.allclose(a, b, rtol=1e-6, atol=0), "timm's scale differs from fastnn.reference"
    if x.is_cuda:
        torch.cuda.set_rng_state(state, x.device)
    else:
        torch.random.set_rng_state(state)


def _fn(impl, x, block, couple, pass_, compiled):
    if impl == "fastnn":
        def fwd(t):
            return F.drop_block2d(t, P, block, couple_channels=couple)
    elif impl == "x*mask":  # the floor: one multiply by a precomputed float mask each way
        m = F.drop_block2d(torch.ones_like(x), P, block, couple_channels=couple)

        def fwd(t):
            return t * m
    else:
        def fwd(t):
            return timm_drop.drop_block_2d(t, P, block, couple_channels=couple)
        if compiled:
            fwd = torch.compile(fwd)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fwd(x)
        return run
    xg = x.detach().requires_grad_(True)
    gout = torch.randn_like(x)

    def run_fb():
        y = fwd(xg)
        return torch.autograd.grad(y, xg, gout)[0]
    return run_fb


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fastnn", "timm", "x*mask", "timm+compile"])
@pytest.mark.parametrize("couple", [False, True], ids=["per_channel", "coupled"])
@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("dtype_i", range(3))
def test_drop_block(benchmark, device, full_sweep, case, dtype_i, couple, impl, pass_):
    cases, dtypes = _cases(device, full_sweep), _dtypes(device, full_sweep)
    if case >= len(cases) or dtype_i >= len(dtypes):
        pytest.skip("not in this sweep (--fastnn-full adds more)")
    if (couple or impl == "timm+compile") and not full_sweep:
        pytest.skip("--fastnn-full")
    shape, block = cases[case]
    dtype = dtypes[dtype_i]
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype)
    if impl == "fastnn":
        _check(x, block, couple)
    fn = _fn("timm" if impl.startswith("timm") else impl, x, block, couple, pass_, impl == "timm+compile")
    fn()  # warm up (compiles, allocator)
    peak = peak_memory_of(fn, device)
    name = f"drop_block2d{'/coupled' if couple else ''} block={block}"
    run_benchmark(benchmark, fn, device=device, op=name, shape=shape, dtype=dtype, pass_=pass_, impl=impl,
                  bytes_moved=_bytes(shape, dtype, pass_), peak_memory=peak)
    benchmark.extra_info["backend"] = fastnn.backends.last_choice("drop_block")[0] if impl == "fastnn" else impl
