"""Cost of checkpoint integrity (sha256 manifest at save, verification at load) on a ~1 GB checkpoint.

    .venv/bin/python benchmarks/checkpoint_integrity.py [--gib 1.0] [--repeats 3] [--dir /tmp/mrlhf_integrity]

One process (gloo): a training checkpoint of --gib GiB -- fp32 weights (a third) and their two Adam moments (two
thirds, the per-rank state file), as SFT saves it -- is written with ``mrlhf.checkpoint.save_checkpoint`` (megatron
dist_checkpointing underneath) and resumed with ``load_checkpoint``. Timed:

- save with the manifest (what mrlhf does) and save with the hashing stubbed out (what it did before);
- the hashing alone, on the files just written (still in the page cache, as at save time); at save the weight shards
  are hashed while the optimizer state is written, so the save pays less than this;
- the NaN/inf scan of the weights that every save runs;
- resume with verification (the default) and with ``checkpoint.verify_integrity=false``, page cache warm.

Each row gives the fastest and the median of --repeats runs (the fastest is the least disturbed by other work on a
shared machine), and the CPU seconds of this process (its threads; the writer's forked processes are not in it).

The machine's page cache serves the just-written files, so the numbers are the CPU cost of hashing; on a cluster
filesystem a cold verification also reads every byte once more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(gib: float):
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor

    class Blob(torch.nn.Module):
        """Plain fp32 tensors with megatron's sharded view (what a role model offers the saver)."""

        def __init__(self, n_tensors: int, numel: int) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.ParameterList(
                torch.nn.Parameter(torch.randn(numel, generator=g)) for _ in range(n_tensors)
            )

        def sharded_state_dict(self, prefix: str = "") -> dict:
            return {f"{prefix}w.{i}": ShardedTensor.from_rank_offsets(f"{prefix}w.{i}", p, replica_id=(0, 0, 0))
                    for i, p in enumerate(self.w)}  # fmt: skip

    class Adam:
        """The optimizer's per-rank state as the checkpoint sees it: two fp32 moments per weight."""

        zero1 = True

        def __init__(self, params) -> None:
            self.state = {"exp_avg": [torch.randn_like(p) for p in params],
                          "exp_avg_sq": [torch.rand_like(p) for p in params]}  # fmt: skip

        def state_dict(self) -> dict:
            return self.state

        def load_state_dict(self, state: dict) -> None:
            self.state = state

    numel = 16 * 2**20  # 64 MiB per tensor
    model = Blob(max(1, round(gib / 3 * 2**30 / (4 * numel))), numel)
    return model, Adam(list(model.parameters()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/mrlhf_integrity")
    args = ap.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from mrlhf import checkpoint as ckpt
    from mrlhf import integrity
    from mrlhf.config import RunConfig
    from mrlhf.parallel.state import destroy_distributed, init_distributed

    init_distributed(RunConfig())
    model, adam = build(args.gib)
    nbytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    names = ("start_hashing", "hash_files", "write_rank_hashes", "collect_manifest")
    real = {n: getattr(integrity, n) for n in names}
    keys = ("save", "save_no_hash", "hash", "nan_scan", "load_verify", "load_no_verify")
    timings: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}

    def timed(key: str, fn, *fn_args) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(*fn_args)
        timings[key].append(time.perf_counter() - t0)
        cpu[key].append(time.process_time() - c0)

    def save(step: int) -> str:
        return ckpt.save_checkpoint(args.dir, step, {"actor": model}, {"actor": adam}, {"step": step}, {}, "h")

    def save_no_hash(step: int) -> str:  # the save as it was before manifests: every hashing step stubbed out
        from concurrent.futures import Future

        done: Future = Future()
        done.set_result({})
        stubs = {"start_hashing": lambda *a: done, "hash_files": lambda *a: {}, "write_rank_hashes": lambda *a: None,
                 "collect_manifest": lambda *a: {}}  # fmt: skip
        for n in names:
            setattr(integrity, n, stubs[n])
        try:
            return save(step)
        finally:
            for n in names:
                setattr(integrity, n, real[n])

    shutil.rmtree(args.dir, ignore_errors=True)
    save(0)  # warm-up: the writer's helper processes, allocator, page cache
    for r in range(args.repeats):
        step = 2 * r + 1
        order = [("save_no_hash", save_no_hash), ("save", save)]
        for i, (key, fn) in enumerate(order if r % 2 == 0 else order[::-1]):  # alternate: no order bias
            timed(key, fn, step + i)
        path = os.path.join(args.dir, f"step_{step + 1:08d}")
        if not json.load(open(os.path.join(path, "meta.json")))["files"]:
            path = os.path.join(args.dir, f"step_{step:08d}")
        files = sorted(json.load(open(os.path.join(path, "meta.json")))["files"])
        timed("hash", integrity.hash_files, path, files)
        timed("nan_scan", ckpt._refuse_non_finite, {"actor": model}, step)
        for verify, key in ((True, "load_verify"), (False, "load_no_verify")):
            integrity.set_verify(verify)
            integrity._verified.clear()  # a fresh process would hash again
            timed(key, ckpt.load_checkpoint, path, {"actor": model}, {"actor": adam}, "h")
        integrity.set_verify(True)
        for entry in os.listdir(args.dir):  # retention outside the timed saves
            if entry.startswith("step_") and os.path.join(args.dir, entry) != path:
                shutil.rmtree(os.path.join(args.dir, entry))
    destroy_distributed()
    shutil.rmtree(args.dir, ignore_errors=True)

    best = {k: min(v) for k, v in timings.items()}
    med = {k: statistics.median(v) for k, v in timings.items()}
    gib = nbytes / 2**30
    print(f"checkpoint: {gib:.2f} GiB (weights + Adam moments, fp32), {len(files)} files, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {args.repeats} repeats, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    names = {"save": "save with sha256 manifest", "save_no_hash": "save without hashing (before)",
             "hash": "  hashing alone (page cache warm)", "nan_scan": "  NaN/inf scan of the weights",
             "load_verify": "resume, verify_integrity=true", "load_no_verify": "resume, verify_integrity=false"}
    print(f"{'':<38} {'fastest':>8} {'median':>8} {'GiB/s':>6} {'CPU s':>6}")
    for k in keys:
        print(f"{names[k]:<38} {best[k]:7.3f}s {med[k]:7.3f}s {gib / best[k]:6.2f} {min(cpu[k]):6.2f}")
    print(f"manifest overhead (fastest runs): save {best['save'] - best['save_no_hash']:+.3f} s "
          f"({100 * (best['save'] / best['save_no_hash'] - 1):+.1f}%), load "
          f"{best['load_verify'] - best['load_no_verify']:+.3f} s "
          f"({100 * (best['load_verify'] / best['load_no_verify'] - 1):+.1f}%)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
