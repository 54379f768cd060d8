"""Our filter, ``worldmodel.kalman.kalman_filter`` (float32, autograd for the backward pass).

Variants: ``seq`` / ``par`` (sequential or associative-scan filter, the parameters shared over the
batch as a world model has them), ``seq_batched`` (the same parameters expanded to ``(B, n, n)``, which
forces a separate covariance recursion per sequence: the dense work the batched peers do), and
``seq_compiled`` / ``par_compiled``: ``torch.compile`` applied to the per-step function (the
sequential step, or the scan's combine operator), never to the unrolled time loop.
"""
import sys

from common import child_main


def versions() -> dict:
    import torch
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def build(problem, variant, grad):
    import torch
    from worldmodel import kalman

    if variant.endswith("_compiled"):
        for name in kalman.__dict__.get("_COMPILED_STEPS", ("_predict", "_update", "_filtering_combine")):
            fn = getattr(kalman, name)
            if not hasattr(fn, "_torchdynamo_orig_callable"):
                setattr(kalman, name, torch.compile(fn, dynamic=False))
    parallel = variant.startswith("par")
    f32 = {k: torch.tensor(problem[k], dtype=torch.float32) for k in ("z", "A", "Q", "C", "R", "m0", "P0")}
    B = f32["z"].shape[0]
    if variant == "seq_batched":
        for k in ("A", "Q", "C", "R", "P0"):
            f32[k] = f32[k].expand(B, *f32[k].shape).contiguous()
        f32["m0"] = f32["m0"].expand(B, -1).contiguous()
    names = ("z", "A", "Q", "C", "R", "m0", "P0")

    def run():
        leaves = [f32[k].clone().requires_grad_(grad and k in ("z", "A", "Q", "C", "R")) for k in names]
        res = kalman.kalman_filter(*leaves, parallel=parallel)
        grads = torch.autograd.grad(res.log_likelihood.sum(), leaves[:5]) if grad else ()
        return res, grads

    def summarise(out):
        res, grads = out
        tensors = (res.log_likelihood, res.filtered.mean, res.filtered.cov, *grads)
        bad = sum(int((~torch.isfinite(x)).sum()) for x in tensors)
        return {"loglik": res.log_likelihood.detach().double().tolist(), "nonfinite": bad}

    return run, summarise


if __name__ == "__main__":
    sys.exit(child_main(versions, build))
