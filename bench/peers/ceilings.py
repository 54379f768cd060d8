"""This machine's ceilings, measured under the same pinning and clock (process CPU time) as the peers.

- ``sgemm_gflops``: a 1024 x 1024 x 1024 matmul, the machine's dense peak;
- ``bmm_gflops[(B, d)]``: a batched (B, d, d) @ (B, d, d) matmul, the rate a filter built from small
  matmuls can reach at that batch and size (dispatch included, as it is for the filter);
- ``dispatch_us``: one trivial op (1-element add), plain and recorded by autograd.
"""
import json
import sys
import time

import torch


def per_call(fn, min_time=0.05, reps=5) -> float:
    """Median over ``reps`` of the mean CPU time of a loop that runs at least ``min_time`` seconds."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = time.process_time()
        for _ in range(n):
            fn()
        t = time.process_time() - t0
        if t >= min_time:
            break
        n *= 2
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - t0) / n)
    return sorted(times)[len(times) // 2]


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    torch.manual_seed(0)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    out = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    out["sgemm_gflops"] = 2 * 1024**3 / per_call(lambda: torch.mm(a, b), min_time=0.2) / 1e9
    rates = {}
    for B in spec["B"]:
        for d in spec["d"]:
            x, y = torch.randn(B, d, d), torch.randn(B, d, d)
            rates[f"{B},{d}"] = 2 * B * d**3 / per_call(lambda: torch.bmm(x, y), spec.get("min_time", 0.05)) / 1e9
    out["bmm_gflops"] = rates
    s, u = torch.ones(1), torch.ones(1)
    out["dispatch_us"] = per_call(lambda: torch.add(s, u)) * 1e6
    g = torch.ones(1, requires_grad=True)
    out["dispatch_autograd_us"] = per_call(lambda: torch.add(g, u)) * 1e6
    json.dump(out, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
