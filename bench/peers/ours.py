"""Our filter, ``worldmodel.kalman.kalman_filter`` (float32, autograd for the backward pass).

Variants: ``seq`` / ``par`` (sequential or associative-scan filter, the parameters shared over the
batch as a world model has them), ``seq_full`` (``seq`` without the steady-state stop of the covariance
recursion: all T steps), ``seq_batched`` (the same parameters expanded to ``(B, n, n)``, which
forces a separate covariance recursion per sequence: the dense work the batched peers do),
``seq_compiled``: ``torch.compile`` applied to one filter step (the public ``predict`` then ``update``
maths, ``_predict`` + ``_update``), looped over time in Python, and ``par_compiled``: the parallel filter
with ``torch.compile`` applied to the scan's combine operator. Never compiled: an unrolled time loop.
``seq_masked``: ``seq`` with 10% of the frames dropped at random per sequence (``mask``, fixed seed), and
``seq_masked_stepwise``: the same on the step-wise filter, the path masked batches took before the fused
filter took missing steps.
"""
import sys

from common import child_main


def versions() -> dict:
    import torch
    from worldmodel.kalman import native
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "loops": native.status()}


STEPS: list[int] = []  # covariance steps computed by each covariance recursion (up to its steady-state stop)


def _record_covariance_steps(fused) -> None:
    """Append to STEPS the step count of every covariance recursion, native or Python (once per process)."""
    forward = fused._CovarianceRecursion.forward
    if hasattr(forward, "recorded"):
        return

    def recorded(ctx, *args):
        out = forward(ctx, *args)
        STEPS.append(out[2].shape[-3])  # X_t = K_t^T, one per computed step
        return out

    recorded.recorded = True
    fused._CovarianceRecursion.forward = staticmethod(recorded)


def build(problem, variant, grad):
    import torch
    from worldmodel.kalman import fused, kalman_filter, parallel, recursions, reference

    f32 = {k: torch.tensor(problem[k], dtype=torch.float32) for k in ("z", "A", "Q", "C", "R", "m0", "P0")}
    B, T, _ = f32["z"].shape
    if variant == "seq_batched":
        for k in ("A", "Q", "C", "R", "P0"):
            f32[k] = f32[k].expand(B, *f32[k].shape).contiguous()
        f32["m0"] = f32["m0"].expand(B, -1).contiguous()
    if variant == "par_compiled" and not hasattr(parallel._filtering_combine, "_torchdynamo_orig_callable"):
        parallel._filtering_combine = torch.compile(parallel._filtering_combine, dynamic=True)  # one graph, all levels
    if variant == "seq_full":
        recursions._STEADY_ULPS = 0.0  # every covariance step, as without the steady-state stop
    _record_covariance_steps(fused)
    mask = None
    if variant.startswith("seq_masked"):
        mask = torch.rand(B, T, generator=torch.Generator().manual_seed(0)) >= 0.1
    if variant == "seq_masked_stepwise":
        import worldmodel.kalman

        worldmodel.kalman._filter_fused = reference._filter_sequential  # kalman_filter's fast path, replaced
    names = ("z", "A", "Q", "C", "R", "m0", "P0")
    eye = torch.eye(f32["A"].shape[-1])

    def step(mean, cov, z_t, A, Q, C, R):
        mean, cov = reference._predict(mean, cov, A, Q, None)
        mean, cov, ll, _ = reference._update(mean, cov, z_t, C, R, None, None, 0.0, eye)
        return mean, cov, ll

    compiled_step = torch.compile(step, dynamic=False) if variant == "seq_compiled" else None

    def run():
        STEPS.clear()
        leaves = [f32[k].clone().requires_grad_(grad and k in ("z", "A", "Q", "C", "R")) for k in names]
        if compiled_step is None:
            res = kalman_filter(*leaves, mask=mask, parallel=variant.startswith("par"))
            ll, outs = res.log_likelihood, (res.filtered.mean, res.filtered.cov)
        else:
            z, A, Q, C, R, mean, cov = leaves
            ll, means, covs = 0.0, [], []
            for z_t in z.unbind(1):
                mean, cov, ll_t = compiled_step(mean, cov, z_t, A, Q, C, R)
                ll = ll + ll_t
                means.append(mean), covs.append(cov)
            outs = (torch.stack(means, 1), torch.stack(covs, -3))
        grads = torch.autograd.grad(ll.sum(), leaves[:5]) if grad else ()
        return ll, outs, grads

    def summarise(out):
        ll, outs, grads = out
        bad = sum(int((~torch.isfinite(x)).sum()) for x in (ll, *outs, *grads))
        record = {"nonfinite": bad, "cov_steps": STEPS[-1] if STEPS else T}
        if mask is None:  # the float64 reference has every frame
            record["loglik"] = ll.detach().double().tolist()
        return record

    return run, summarise


if __name__ == "__main__":
    sys.exit(child_main(versions, build))
