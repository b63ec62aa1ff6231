"""By hand only, never in CI: ``python -m benchmarks.gpu_check``.

DP training (ghost and hooks, batch 1024) and inference (encoder forward) throughput on CUDA
vs CPU for the default encoder on a synthetic silo, printed with the GPU/CPU ratio. Exits
with status 2 and a clear message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.workload import fresh_encoder, synthetic_features, time_epoch


def _forward_rate(device: str, rows: int, batch_size: int = 8192) -> float:
    data = synthetic_features("ecommerce", rows).to(device)
    model = fresh_encoder(data, device=device).eval()
    with torch.no_grad():
        model.embed(data.batch(torch.arange(min(rows, batch_size), device=device)))  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, rows, batch_size):
            model.embed(data.batch(torch.arange(first, min(rows, first + batch_size), device=device)))
        if device == "cuda":
            torch.cuda.synchronize()
    return rows / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000, help="synthetic training rows (default 50000)")
    parser.add_argument("--users", type=int, default=500_000, help="users for the forward pass (default 500000)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks.gpu_check: no CUDA device is available (torch.cuda.is_available() is False); "
            "nothing to measure."
        )
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'workload':<34}{'CPU /s':>12}{'GPU /s':>12}{'GPU/CPU':>9}")
    for mode in ("non-private", "ghost", "hooks"):
        rates = {}
        for device in ("cpu", "cuda"):
            data = synthetic_features("ecommerce", args.rows).to(device)
            time_epoch(data, mode=mode, batch_size=1024, device=device)  # warm-up
            rates[device] = time_epoch(data, mode=mode, batch_size=1024, device=device).samples_per_s
        print(f"{'train ' + mode + ' (batch 1024)':<34}{rates['cpu']:>12,.0f}{rates['cuda']:>12,.0f}"
              f"{rates['cuda'] / rates['cpu']:>8.1f}x")  # fmt: skip
    cpu, gpu = _forward_rate("cpu", args.users), _forward_rate("cuda", args.users)
    print(f"{'inference forward (batch 8192)':<34}{cpu:>12,.0f}{gpu:>12,.0f}{gpu / cpu:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
