"""Device-agnosticism of the filter, the priors, the k-step predictive, evaluation and the WorldModel.

The bug class is a tensor created on the CPU (``torch.eye(n)``, ``torch.arange(T)``, ``torch.tensor(...)``
without ``device=``) and combined with inputs on a GPU, and host synchronisations inside loops. Without a
GPU, the ``meta`` device alone does not catch it: meta tensors have no values, so every value-dependent
step (the input checks, the jitter retry, the steady-state stop) fails before the paths under test run,
and results cannot be compared with the CPU's. Instead every test runs on ``device``:

* ``fake`` (always): inputs are CPU tensors presented as tensors on another device (``meta``) by a tensor
  subclass, with a dispatch mode (``_FakeDevice``) that computes every op on the wrapped CPU tensors. An op
  that combines such a tensor with a CPU tensor raises as CUDA does (a 0-d CPU tensor is a scalar, and CPU
  indices may index, as on CUDA); factories with ``device=`` the fake device make fake tensors. The code takes
  its non-CPU branches (no native loops, no thread pinning), computes real values, and the mode counts host
  synchronisations (``.item()``, ``bool()``, ``.tolist()``, transfers, boolean indexing, ``nonzero``).
* ``cuda`` (skipped without a GPU): the same tests on CUDA; ``torch.cuda.set_sync_debug_mode`` counts the
  synchronisations.

Results are compared with the same computation on the CPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from worldmodel.evaluation import predictive_metrics
from worldmodel.kalman import Gaussian, gaussian_log_prob, kalman_filter, predict, rts_smoother, update
from worldmodel.model import ModelConfig, WorldModel
from worldmodel.objective import kstep_predictive, multistep_log_likelihood
from worldmodel.kalman.recursions import _STEADY_EVERY
from worldmodel.priors import KalmanLatentModel

from test_kalman import make_system

pytestmark = pytest.mark.usefixtures("single_thread")

_FAKE = torch.device("meta")
_aten = torch.ops.aten
_TRANSFERS = {_aten._to_copy.default, _aten.copy_.default}
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
# ops that wait for the device: .item(), outputs of data-dependent shape, and linear algebra whose errors or
# convergence CUDA checks on the host (the error checks of linalg.cholesky, lu_factor, ...; SVD; eigensolvers)
_SYNCING = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
            _aten._linalg_check_errors.default, _aten._linalg_svd.default, _aten._linalg_eigh.default,
            _aten.linalg_eig.default}


class _Fake(Tensor):
    """A CPU tensor ``elem`` presented as a tensor on ``_FAKE`` (ops run in ``_FakeDevice``)."""

    @staticmethod
    def __new__(cls, elem: Tensor):
        return Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                             storage_offset=elem.storage_offset(), device=_FAKE,
                                             requires_grad=elem.requires_grad)

    def __init__(self, elem: Tensor):
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a fake-device tensor outside _FakeDevice")

    def tolist(self):
        _FakeDevice.active.syncs += 1
        return self.elem.tolist()

    def __repr__(self):
        return f"_Fake({self.elem!r})"


def _on_fake(device) -> bool:
    return device is not None and torch.device(device).type == _FAKE.type


class _FakeDevice(TorchDispatchMode):
    """Runs every op on a ``_Fake`` tensor (or a factory with ``device=_FAKE``) on the wrapped CPU tensors
    and wraps the results; raises where an op mixes a fake tensor with a CPU tensor CUDA would reject;
    counts host synchronisations in ``syncs``."""

    active: "_FakeDevice"  # the one in use (``_Fake.tolist`` counts its synchronisation there)

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __enter__(self):
        _FakeDevice.active = self
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
        to_fake = _on_fake(kwargs.get("device"))
        if not to_fake and not any(isinstance(x, _Fake) for x in tensors):
            return func(*args, **kwargs)  # a CPU op
        if func in _TRANSFERS:  # _to_copy(source, device=...) or copy_(target, source)
            source = args[0] if func is _aten._to_copy.default else args[1]
            to_fake = to_fake or isinstance(args[0], _Fake) and (func is _aten.copy_.default
                                                                 or kwargs.get("device") is None)
            self.syncs += isinstance(source, _Fake) != to_fake  # without non_blocking, CUDA waits for a copy
        else:
            indices = [x for x in tree_leaves(args[1]) if isinstance(x, Tensor)] if func in _INDEXING else []
            mixed = [tuple(x.shape) for x in tensors if not isinstance(x, _Fake) and all(x is not i for i in indices)
                     and (x.dim() or func is _aten.cat.default)]
            if mixed:
                raise RuntimeError(f"{func}: expected all tensors on {_FAKE}, got CPU tensors of shapes {mixed}")
            to_fake = True
            # also boolean masks (data-dependent shapes) and CPU indices (copied over first) wait
            self.syncs += func in _SYNCING or any(i.dtype == torch.bool or not isinstance(i, _Fake)
                                                         for i in indices)
        args, kwargs = tree_map(lambda x: x.elem if isinstance(x, _Fake) else x, (args, kwargs))
        if _on_fake(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        out = func(*args, **kwargs)
        return tree_map(lambda x: _Fake(x) if isinstance(x, Tensor) else x, out) if to_fake else out


class _Device:
    """Where a test runs: ``put`` moves tensors in any nesting (keeping ``requires_grad``) and modules (a copy) there,
    ``host`` brings them back to the CPU (tensors in any nesting), ``count_syncs`` counts host synchronisations."""

    def __init__(self, mode: _FakeDevice | None = None):
        self.mode = mode  # None: CUDA

    @property
    def torch_device(self) -> torch.device:
        return _FAKE if self.mode else torch.device("cuda")

    def put(self, x):
        if isinstance(x, torch.nn.Module):
            return copy.deepcopy(x).to(self.torch_device)
        return tree_map(lambda t: t.detach().to(self.torch_device).requires_grad_(t.requires_grad)
                        if isinstance(t, Tensor) else t, x)

    def host(self, x):
        def back(t):
            return t.elem if isinstance(t, _Fake) else t.detach().cpu()

        return tree_map(lambda t: back(t) if isinstance(t, Tensor) else t, x)

    def count_syncs(self, fn, *args, **kwargs):
        """``(fn(*args, **kwargs), the number of host synchronisations it made)``."""
        if self.mode:
            before = self.mode.syncs
            out = fn(*args, **kwargs)
            return out, self.mode.syncs - before
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return out, sum("synchronizing" in str(w.message) for w in caught)


@pytest.fixture(params=["fake", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def device(request, monkeypatch):
    if request.param == "cuda":
        yield _Device()
        return
    autocast = torch.autocast  # meta has no autocast: the code's autocast(device.type) gets the CPU's
    monkeypatch.setattr(torch, "autocast", lambda device_type, *args, **kwargs: autocast(
        "cpu" if device_type == _FAKE.type else device_type, *args, **kwargs))
    with _FakeDevice() as mode:
        yield _Device(mode)


def _leaves(x) -> list[Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, Tensor)]


def _parameters(inputs: dict) -> list[Tensor]:
    """The tensors of ``inputs`` that require grad, then the parameters of its modules that do."""
    tensors = [x for x in inputs.values() if isinstance(x, Tensor) and x.requires_grad]
    return tensors + [p for x in inputs.values() if isinstance(x, torch.nn.Module) for p in x.parameters()
                      if p.requires_grad]


def _compare(device: _Device, fn, rtol=1e-8, atol=1e-10, **inputs):
    """``fn(**inputs)`` on the CPU and with ``inputs`` (tensors, modules) on ``device``: the outputs agree, all
    of them are on ``device``, and so do the gradients of the sum of the outputs that carry one, with
    respect to the tensors that require grad and the modules' parameters."""
    moved = {k: device.put(v) for k, v in inputs.items()}
    want, got = fn(**inputs), fn(**moved)
    assert all(t.device.type == device.torch_device.type for t in _leaves(got))
    torch.testing.assert_close(device.host(got), want, rtol=rtol, atol=atol)
    params = _parameters(inputs)
    if params:
        grads = [torch.autograd.grad(sum(t.sum() for t in _leaves(out) if t.requires_grad), _parameters(x),
                                     allow_unused=True) for out, x in ((want, inputs), (got, moved))]
        torch.testing.assert_close(device.host(grads[1]), grads[0], rtol=rtol, atol=atol)


def test_fake_device_rejects_cpu_tensors_and_counts_host_syncs(device):
    """What the ``fake`` device stands for: CUDA's rules for CPU tensors, and its synchronisations."""
    x = device.put(torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="xpected all tensors"):
        x + torch.ones(3)
    with pytest.raises(RuntimeError, match="xpected all tensors"):
        x @ torch.eye(3)
    y, syncs = device.count_syncs(lambda: x * torch.tensor(2.0) + torch.eye(3, device=x.device))
    assert y.device == x.device and syncs == 0  # a 0-d CPU tensor is a scalar
    for sync in (lambda: bool(x.any()), lambda: x.sum().item(), lambda: x.tolist(), lambda: x.cpu(),
                 lambda: x[x > 0], lambda: x[torch.tensor([0, 2])], lambda: torch.ones(2).to(x.device)):
        assert device.count_syncs(sync)[1] == 1


# ---- the filter ----------------------------------------------------------------------------------------

FILTER_CASES = {  # make_system options and kalman_filter keywords; all fused or one of the other paths
    "fused": (dict(k=2), dict(target=True)),
    "fused batched": (dict(batched=True), {}),
    "parallel": (dict(k=2), dict(parallel=True)),
    "masked": (dict(k=2), dict(mask=True)),
    "per-step R parallel": (dict(per_step_R=True), dict(parallel=True, mask=True)),
}


def _filter_inputs(case: str, steps: int) -> dict:
    """kalman_filter's keywords for ``FILTER_CASES[case]`` (a few steps missing where it has a mask; the
    target is z shifted) with every floating-point input requiring grad."""
    system, options = FILTER_CASES[case]
    z, sys = make_system(steps=steps, **system)
    inputs = dict(z=z, **sys, parallel=options.get("parallel", False))
    if options.get("mask"):
        inputs["mask"] = torch.rand(z.shape[:2], generator=torch.Generator().manual_seed(1)) > 0.2
    if options.get("target"):
        inputs["target"] = z.roll(1, 1)
    return {k: v.requires_grad_() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_kalman_filter_on_device_equals_cpu(device, case):
    """Every filter path on ``device``: the same filtered and predicted beliefs, likelihoods and gradients
    with respect to every input as on the CPU, all of them on ``device``."""
    _compare(device, kalman_filter, **_filter_inputs(case, steps=12))


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_kalman_filter_host_syncs_do_not_grow_with_length(device, case):
    """No host synchronisation per step: one for the input checks, one for the missing steps (with a mask),
    one for the Cholesky factorisations; the fused filter's covariance recursion (masked batches' too) checks
    for its steady state every few steps until it reaches it (at most ``steps / _STEADY_EVERY`` times)."""
    counts = []
    for steps in (64, 256):
        inputs = {k: device.put(v) for k, v in _filter_inputs(case, steps).items()}
        counts.append(device.count_syncs(kalman_filter, **inputs)[1])
    assert counts[0] == counts[1]
    fused = "fused" in case or case == "masked"  # masked batches take the fused filter (one recursion per mask row)
    assert counts[0] <= 2 + ("mask" in inputs) + (64 // _STEADY_EVERY if fused else 0)


def test_single_steps_smoother_and_log_density_on_device(device):
    """predict, update (a masked row, a NaN row), rts_smoother and gaussian_log_prob on ``device``; update
    synchronises once (its Cholesky check), not also to find the missing rows."""
    z, sys = make_system(steps=5)
    belief = Gaussian(sys["m0"].expand(3, 4), sys["P0"].expand(3, 4, 4))
    obs = z[:, 0].clone()
    obs[1] = float("nan")
    mask = torch.tensor([True, True, False])
    _compare(device, predict, belief=belief, A=sys["A"], Q=sys["Q"], B=sys["B"], u=sys["u"][:, 0])
    _compare(device, update, belief=belief, z=obs, C=sys["C"], R=sys["R"], mask=mask)
    moved = [device.put(x) for x in (belief, obs, sys["C"], sys["R"], mask)]
    assert device.count_syncs(update, *moved)[1] == 1
    result = kalman_filter(z, **sys)
    _compare(device, rts_smoother, result=result, A=sys["A"], Q=sys["Q"])
    _compare(device, gaussian_log_prob, x=z, mean=z.flip(0), cov=sys["R"])


# ---- the prior, the k-step predictive, evaluation, the WorldModel ----------------------------------------


def _prior(seed=0) -> KalmanLatentModel:
    """A float64 KalmanLatentModel (L = 2, S = 4, one action) with a bias and control."""
    torch.manual_seed(seed)
    prior = KalmanLatentModel(obs_dim=2, state_dim=4, action_dim=1, full_cov=True).double()
    with torch.no_grad():
        prior.G.normal_(0, 0.5), prior.b.normal_(0, 0.3), prior.R_cov.lower.normal_(0, 0.1)
    return prior


def _latents(batch=3, steps=24, seed=0) -> dict[str, Tensor]:
    """Latents z (B, T, 2) with a NaN frame, actions (B, T, 1), a mask (B, T) and variances R (B, T, 2)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, steps, 2, dtype=torch.float64, generator=gen)
    z[1, 7] = float("nan")
    mask = torch.rand(batch, steps, generator=gen) > 0.2
    return dict(z=z, u=torch.randn(batch, steps, 1, dtype=torch.float64, generator=gen), mask=mask,
                R=0.1 + torch.rand(batch, steps, 2, dtype=torch.float64, generator=gen))


def test_kalman_prior_and_kstep_predictive_on_device(device):
    """KalmanLatentModel.filter (mask, per-frame R), init_belief, step, rollout, predict_observation, the
    k-step predictive from steps given on the CPU (its times and validity follow the beliefs' device) and
    the k-step loss term on ``device``, with the gradients of the prior's parameters. An online step
    synchronises twice: the SVD of the spectral bound on A (CUDA checks its convergence on the host) and
    update's Cholesky check, not also to find the missing rows."""
    data = _latents()

    def run(prior, z, u, mask, R):
        filtered = prior.filter(z, u, mask, R).filtered
        belief = prior.step(prior.init_belief(3), z[:, 0], u[:, 0], mask[:, 0], R[:, 0])
        outputs = [filtered, belief, prior.predict_observation(prior.rollout(belief, u[:, :5]))]
        outputs.append(kstep_predictive(prior, filtered, u, torch.arange(4, 20), 6))
        z_observed = torch.where(mask[..., None], z.nan_to_num(), 0.0)
        return outputs + [multistep_log_likelihood(prior, z_observed, z_observed.roll(1, 1), 5, u, mask, R)]

    _compare(device, run, prior=_prior(), **data)
    prior, z, u, mask = (device.put(x) for x in (_prior(), data["z"], data["u"], data["mask"]))
    belief = prior.init_belief(3)
    assert device.count_syncs(prior.step, belief, z[:, 0], u[:, 0], mask[:, 0])[1] == 2


def test_predictive_metrics_on_device_one_sync_for_all_horizons(device):
    """predictive_metrics of latents on ``device`` with actions and a mask on the CPU (moved to the
    latents'): the CPU's scores, cross-fitted recalibrated coverage included; host synchronisations independent
    of the horizon."""
    data = _latents(steps=30)
    prior, z = device.put(_prior()), device.put(data["z"])
    want = predictive_metrics(_prior(), data["z"], data["u"], horizon=8, burn_in=3, mask=data["mask"], folds=2)
    got = predictive_metrics(prior, z, data["u"], horizon=8, burn_in=3, mask=data["mask"], folds=2)
    assert got["k"] == want["k"] and len(got["k"]) == 8 and "calibrated_2sigma" in got  # recalibrated on device
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    syncs = [device.count_syncs(predictive_metrics, prior, z, horizon=h, burn_in=3)[1] for h in (2, 8)]
    assert syncs[0] == syncs[1]


def test_world_model_on_device(device):
    """WorldModel.loss (and its gradients), filter, step and imagine of a kalman model on ``device``."""
    torch.manual_seed(0)
    model = WorldModel(ModelConfig(encoder="mlp", input_dim=5, hidden=16, latent_dim=2, action_dim=1)).double()
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(4, 10, 5, dtype=torch.float64, generator=gen)
    actions = torch.randn(4, 10, 1, dtype=torch.float64, generator=gen)

    def run(model, frames, actions):
        loss = model.loss(frames, actions).loss
        belief = model.step(model.init_belief(4), frames[:, 0])
        return [loss, model.filter(frames, actions), model.imagine(belief, actions[:, :3], observe=True)]

    _compare(device, run, rtol=1e-7, atol=1e-9, model=model, frames=frames, actions=actions)


def test_planning_and_reward_head_on_device(device):
    """MPC.plan with a goal (lqr; the sampling solvers are covered in test_planning_solvers, and the fake device
    cannot hold a torch.Generator), the reward head's fit on the model's k-step predictive beliefs and
    WorldModel.reward, on ``device`` equal to the CPU."""
    from worldmodel.planning import MPC, fit_reward_head

    torch.manual_seed(0)
    config = ModelConfig(encoder="mlp", input_dim=5, hidden=16, latent_dim=2, action_dim=1, reward_head=True,
                         multistep_horizon=0, planner={"action_low": [-1.0], "action_high": [1.0], "horizon": 4,
                                                      "samples": 8, "elites": 3, "iterations": 2})
    model = WorldModel(config).double().eval().requires_grad_(False)  # planning is not differentiated
    model.prior.G.data.fill_(0.5)  # a controllable prior (G = 0 at initialisation: LQR is then singular)
    gen = torch.Generator().manual_seed(0)
    data = {"obs": torch.randn(3, 12, 5, dtype=torch.float64, generator=gen),
            "action": torch.rand(3, 12, 1, dtype=torch.float64, generator=gen) * 2 - 1,
            "reward": torch.randn(3, 12, dtype=torch.float64, generator=gen),
            "mask": torch.ones(3, 12, dtype=torch.bool)}
    goal = torch.randn(2, 5, dtype=torch.float64, generator=gen)

    def run(model, goal, **data):
        fit_reward_head(model, data, horizon=3)
        belief = model.step(model.init_belief(2), data["obs"][:2, 0])
        plan = MPC(model, goal=goal, solver="lqr").plan(belief)
        return [plan, model.reward(belief, data["action"][:2, 0]), model.reward_head.Whh]

    _compare(device, run, rtol=1e-6, atol=1e-8, model=model, goal=goal, **data)
