"""Convert a torchvision ResNet-50 with fastnn.convert and time it against the unconverted model.

    python examples/convert_resnet.py                      # CUDA when present, else CPU (small batch)
    python examples/convert_resnet.py --batch 64 --size 224 --iters 30

Prints the conversion report, checks that both models agree, then times a training step
(forward, backward, SGD step) and inference (eval, inference_mode) of both models, interleaved
in the same run, and prints the medians and the speedups. Random weights: nothing is downloaded.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    import fastnn
except ImportError:  # run from a source checkout (built in place) without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fastnn


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="a torchvision.models constructor name (default resnet50)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--size", type=int, default=None, help="image side (default 224 on CUDA, 112 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per model (default 20 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per model first")
    p.add_argument("--channels-last", action="store_true", help="channels_last models and inputs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main():
    args = parse()
    import torchvision

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 4)
    size = args.size or (224 if cuda else 112)
    iters = args.iters or (20 if cuda else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=1000).to(device, memory_format=fmt)
    t = time.perf_counter()
    fast = fastnn.convert(model)  # a converted copy; `model` stays as it was
    t_convert = time.perf_counter() - t
    print(fast.fastnn_report)
    print(f"\nconverted in {t_convert:.2f} s")

    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)

    # the two models agree before anything is timed
    model.eval()
    fast.eval()
    # in true fp32: with TF32 (cuDNN's default for convs) both models round differently, ~1e-4
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        a, b = model(x), fast(x)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    err = ((a - b).norm() / a.norm()).item()
    print(f"eval outputs (fp32, TF32 off): relative error {err:.2e}")

    opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (model, fast)}

    def train_step(m):
        def run():
            m.train()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opts[id(m)].step()
            opts[id(m)].zero_grad(set_to_none=True)
        return run

    def infer(m):
        def run():
            m.eval()
            with torch.inference_mode():
                m(x)
        return run

    print(f"\n{args.model}, batch {batch}, {size}x{size}, {device.type}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else f', {torch.get_num_threads()} threads'}"
          f", {iters} timed iterations each, interleaved")
    results = {}
    for what, make in (("training step", train_step), ("inference", infer)):
        fns = {"torch": make(model), "fastnn": make(fast)}
        for _ in range(args.warmup):
            for f in fns.values():
                f()
        times = {k: [] for k in fns}
        for i in range(iters):
            order = list(fns) if i % 2 == 0 else list(fns)[::-1]  # alternate who goes first
            for k in order:
                times[k].append(timed(fns[k], device))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[what] = med
        print(f"  {what:<14} torch {med['torch'] * 1e3:9.1f} ms   fastnn {med['fastnn'] * 1e3:9.1f} ms   "
              f"speedup {med['torch'] / med['fastnn']:.2f}x")
    return results


if __name__ == "__main__":
    main()
