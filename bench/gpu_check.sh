#!/usr/bin/env bash
# The CUDA path in one command: the device tests (tests/test_devices.py runs the filter, the prior, the
# k-step predictive, evaluation and the WorldModel on CUDA against the CPU), a short training run with its
# evaluation and online filtering, the training-step benchmark and a filter timing against the CPU.
#
#   bash bench/gpu_check.sh                      # on a machine with a CUDA GPU (under 10 minutes)
#   bash bench/gpu_check.sh --quick              # test_devices.py only, 5 training steps, eager only
#   DEVICE=cpu bash bench/gpu_check.sh --quick   # a dry run of this script without a GPU
#
# Environment: DEVICE (default cuda), PYTHON (default .venv/bin/python if present, else python3; it needs a
# torch with CUDA), OUT (the log, the run and the results go to $OUT/gpu-check; default a new temp dir).
# Every step has a time limit (under 10 minutes in all); the exit status is 1 if any step failed, and the
# summary at the end names it. bench/kalman.py (CPU only: the filter against its CPU peers) is not run.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
WORK=${OUT:-$(mktemp -d)}/gpu-check
mkdir -p "$WORK"
LOG=$WORK/gpu_check.log
: >"$LOG"
SUMMARY=()
FAILED=0

if [ "$QUICK" = 1 ]; then
    TESTS=tests/test_devices.py STEPS=5 BATCH=4 BENCH="--modes eager --batch 4 --T 32 --reps 2" REPS=3
else
    TESTS="tests/test_devices.py tests/test_kalman.py tests/test_evaluation.py" STEPS=50 BATCH=16 BENCH= REPS=10
fi
export DEVICE PYTHON WORK TESTS STEPS BATCH BENCH REPS

step() {  # step NAME SECONDS: run the function NAME with a time limit, its output to the terminal and the log
    local name=$1 limit=$2 start=$SECONDS rc status=ok
    echo "== $name" | tee -a "$LOG"
    timeout "$limit" bash -c "set -o pipefail; $(declare -f "$name"); $name" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ]; then status="TIMEOUT after $limit s"; elif [ "$rc" != 0 ]; then status="FAILED (exit $rc)"; fi
    [ "$status" = ok ] || FAILED=1
    SUMMARY+=("$(printf '%-13s %-22s %4d s' "$name" "$status" $((SECONDS - start)))")
}

preflight() {
    "$PYTHON" -c "
import sys, torch
device = torch.device('$DEVICE')
if device.type == 'cuda' and not torch.cuda.is_available():
    sys.exit('torch ' + torch.__version__ + ' of $PYTHON sees no CUDA GPU: set PYTHON to one with CUDA (or DEVICE=cpu)')
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu')"
}

tests() {  # the CUDA variants of the device tests must run, not be skipped
    "$PYTHON" -m pytest -q -rs -p no:cacheprovider $TESTS | tee "$WORK/pytest.log" &&
        { [ "$DEVICE" = cpu ] || ! grep -q "needs a CUDA GPU" "$WORK/pytest.log"; }
}

train() {
    "$PYTHON" train.py --device "$DEVICE" --steps "$STEPS" --batch-size "$BATCH" --name gpu-check \
        --out-dir "$WORK/runs" --data "$WORK/data.zarr" --train-episodes 16 --val-episodes 4 --no-progress
}

filter() {  # online filtering of a held-out episode, frame by frame
    "$PYTHON" train.py filter --name gpu-check --out-dir "$WORK/runs" --device "$DEVICE" --no-progress
}

bench_train() {  # bench/train.py records a failed mode in train.json and still exits 0
    "$PYTHON" bench/train.py --device "$DEVICE" --out "$WORK/bench" $BENCH && ! grep -q '"error"' "$WORK/bench/train.json"
}

bench_filter() {
    "$PYTHON" - "$DEVICE" "$REPS" <<'PY'
"""Forward + backward of kalman_filter (fused and parallel, float32) on the device and on the CPU (one
thread, as bench/kalman.py): the mean of up to REPS calls after a warm-up one, within about 2 s."""
import sys
import time

import torch

from worldmodel.kalman import kalman_filter

device, reps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)


def seconds(where: str, parallel: bool, n: int, m: int, batch: int, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    A = 0.95 * torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    inputs = [torch.randn(batch, steps, m, generator=gen), A, 0.1 * torch.eye(n), torch.randn(m, n, generator=gen),
              0.5 * torch.eye(m), torch.zeros(n), torch.eye(n)]
    inputs = [x.to(where).requires_grad_() for x in inputs]

    def call():
        kalman_filter(*inputs, parallel=parallel).log_likelihood.sum().backward()
        if where.startswith("cuda"):
            torch.cuda.synchronize()

    call()
    calls, start = 0, time.perf_counter()
    while calls < reps and (calls == 0 or time.perf_counter() - start < 2.0):
        call()
        calls += 1
    return (time.perf_counter() - start) / calls


# the default model, the world-model point of bench/kalman.py, a long sequence (cuthbert's T = 1000, d = 20)
for n, m, batch, steps in ((16, 8, 16, 32), (32, 32, 16, 64), (20, 20, 1, 1000)):
    times = {}
    for parallel in (False, True):
        here, cpu = seconds(device, parallel, n, m, batch, steps), seconds("cpu", parallel, n, m, batch, steps)
        times[parallel] = here
        print(f"filter {'parallel' if parallel else 'fused'} n={n} m={m} B={batch} T={steps}: {device} "
              f"{1e3 * here:.1f} ms, cpu {1e3 * cpu:.1f} ms (cpu/{device} {cpu / here:.2f}) forward+backward")
    print(f"filter scan n={n} m={m} B={batch} T={steps}: parallel scan {times[False] / times[True]:.2f}x the "
          f"sequential filter on {device}")
PY
}

step preflight 30
if [ "$FAILED" = 0 ]; then  # a torch without the device fails every later step too
    step tests 150
    step train 150
    step filter 45
    step bench_train 120
    step bench_filter 90
fi

{
    echo
    echo "gpu_check ($DEVICE$([ "$QUICK" = 1 ] && echo ', quick')): log $LOG"
    printf '%s\n' "${SUMMARY[@]}"
    grep -h -E '^(eager|compiled|paper): |^filter (fused|parallel|scan) ' "$LOG"
    if [ "$FAILED" = 0 ]; then echo "all steps passed"; else echo "FAILED: see the log"; fi
} | tee -a "$LOG"
exit "$FAILED"
