"""The sampler's Gumbel noise on the CPU: the torch twin against mrlhf::uniform_noise, in one run.

(1) noise    U(0,1) [B, V] float64: ``reference.uniform_noise`` (vectorised int64 splitmix64 in torch ops) vs
             ``torch.ops.mrlhf.uniform_noise`` (the same bits in one pass).
(2) to token what a sampled decode step does from the noise on (TP=1): the sampler before the kernel (twin noise,
             out-of-place -log(-log(u)), ``choice.double() + g``, max) vs now (kernel noise, the same torch ops in
             place, ``g.add_(choice)``, max). Both give the same tokens; the script checks it.

    .venv/bin/python benchmarks/sampling_noise.py [--shapes 16x8000 64x32000] [--threads 0 1] [--reps 30]

Times are the median (and fastest) of ``--reps`` calls after a warm-up, per torch thread count (0: torch's default).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def per_call_ms(fn, reps: int) -> tuple[float, float]:
    """(median, min) milliseconds per call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def cases(b: int, v: int):
    """(twin noise, kernel noise, noise-to-token before, noise-to-token now) as calls on fixed [b, v] inputs."""
    import torch

    from mrlhf.ops import reference

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2**40, (b,), generator=g)
    choice = torch.randn(b, v, generator=g) * 3  # scaled logits, float32
    seed, step, start = 1234, 7, 0

    def noise_torch():
        return reference.uniform_noise(seed, ids, step, start, v)

    def noise_kernel():
        return torch.ops.mrlhf.uniform_noise(seed, ids, step, start, v)

    def token_before():
        gumbel = -torch.log(-torch.log(reference.uniform_noise(seed, ids, step, start, v)))
        return (choice.double() + gumbel).max(dim=-1)

    def token_now():
        gumbel = torch.ops.mrlhf.uniform_noise(seed, ids, step, start, v).log_().neg_().log_().neg_()
        return gumbel.add_(choice).max(dim=-1)

    return noise_torch, noise_kernel, token_before, token_now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["16x8000", "64x32000"], help="BxV")
    ap.add_argument("--threads", nargs="+", type=int, default=[0, 1], help="torch threads (0: default)")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()

    import torch

    from mrlhf.ops import kv_ops

    if "cpu" not in kv_ops.EXT_DEVICES:
        sys.exit(f"mrlhf._C is not in use ({kv_ops.describe_backend()}): build it with scripts/setup.sh")
    default_threads = torch.get_num_threads()
    print(
        f"# sampling_noise  {datetime.date.today()}  {cpu_name()}  cores={os.cpu_count()}  torch {torch.__version__}  "
        f"CPU path {torch.ops.mrlhf.cpu_isa()}  load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'part':>9} {'B x V':>9} {'threads':>7} {'torch ms':>19} {'mrlhf ms':>19} {'ratio':>7}  (median / min)")
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        for shape in args.shapes:
            b, v = (int(n) for n in shape.split("x"))
            noise_torch, noise_kernel, token_before, token_now = cases(b, v)
            assert torch.equal(noise_torch(), noise_kernel())
            before, now = token_before(), token_now()
            assert torch.equal(before.indices, now.indices) and torch.equal(before.values, now.values)
            for part, slow, fast in [("noise", noise_torch, noise_kernel), ("to token", token_before, token_now)]:
                (ts, ts_min), (tf, tf_min) = per_call_ms(slow, args.reps), per_call_ms(fast, args.reps)
                print(
                    f"{part:>9} {shape:>9} {threads or default_threads:>7} {ts:>10.3f} / {ts_min:<8.3f}"
                    f"{tf:>10.3f} / {tf_min:<8.3f}{ts / tf:>6.1f}x"
                )
    print(f"# done, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
