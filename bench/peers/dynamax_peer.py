"""Peer: dynamax's lgssm_filter on JAX CPU, jit-compiled, vmapped over the batch (float32).

``variant``: ``seq`` (lax.scan filter) or ``par`` (associative-scan filter, Särkkä & García-Fernández
2021). The backward pass is ``jax.grad`` of the summed log-likelihood w.r.t. z, A, Q, C and R; the
forward returns the filtered beliefs too, so XLA cannot drop them as dead code.
"""
import sys

import numpy as np

from common import child_main, first_prior


def versions() -> dict:
    import dynamax
    import jax
    import jaxlib
    return {"dynamax": getattr(dynamax, "__version__", "?"), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "backend": jax.default_backend()}


def build(problem, variant, grad):
    import jax
    import jax.numpy as jnp
    from dynamax.linear_gaussian_ssm import lgssm_filter, parallel_lgssm_filter
    from dynamax.linear_gaussian_ssm.inference import make_lgssm_params

    filt = {"seq": lgssm_filter, "par": parallel_lgssm_filter}[variant]
    mu1, P1 = (jnp.asarray(x, jnp.float32) for x in first_prior(problem))
    args = tuple(jnp.asarray(problem[k], jnp.float32) for k in ("z", "A", "Q", "C", "R"))

    def batch_filter(z, A, Q, C, R):
        params = make_lgssm_params(mu1, P1, A, Q, C, R)
        post = jax.vmap(lambda y: filt(params, y))(z)
        return post.marginal_loglik, post.filtered_means, post.filtered_covariances

    if grad:
        def loss(*a):
            ll, means, covs = batch_filter(*a)
            return ll.sum(), ll
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
    else:
        fn = jax.jit(batch_filter)

    def run():
        return jax.block_until_ready(fn(*args))

    def summarise(out):
        if grad:
            grads, ll = out
            arrays = (ll, *grads)
        else:
            ll = out[0]
            arrays = out
        bad = sum(int((~np.isfinite(np.asarray(x))).sum()) for x in arrays)
        return {"loglik": np.asarray(ll, np.float64).tolist(), "nonfinite": bad}

    return run, summarise


if __name__ == "__main__":
    sys.exit(child_main(versions, build))
