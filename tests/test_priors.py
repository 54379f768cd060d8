"""The prior interface: a new state-space prior is one class and one registry row, and then the objective,
WorldModel (filter / step / imagine), the k-step term and the k-step metrics all work with it, with no
change anywhere else. Checked with a random-walk prior written here against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from worldmodel import methods, priors
from worldmodel.evaluation import predictive_metrics
from worldmodel.kalman import Gaussian, kalman_filter, predict, update
from worldmodel.methods import Preset, make
from worldmodel.model import ModelConfig, WorldModel
from worldmodel.priors import FactorizedPrior, KalmanLatentModel, LatentPrior, StateSpacePrior, TransitionPrior


class RandomWalkPrior(StateSpacePrior):
    """h_t = h_{t-1} + w_t, w ~ N(0, q I); z_t = h_t + v_t, v ~ N(0, r I); q learned, r fixed."""

    def __init__(self, obs_dim: int, action_dim: int = 0, r: float = 0.5):
        super().__init__()
        self.obs_dim = self.state_dim = obs_dim
        self.action_dim, self.r = action_dim, r
        self.log_q = nn.Parameter(torch.zeros(()))

    def _eye(self):
        return torch.eye(self.obs_dim, dtype=self.log_q.dtype)

    def init_belief(self, batch_size):
        return Gaussian(self.log_q.new_zeros(batch_size, self.obs_dim), self._eye().expand(batch_size, -1, -1))

    def filter(self, z, u=None, mask=None, R=None, target=None):
        eye = self._eye()
        return kalman_filter(z, eye, self.log_q.exp() * eye, eye, self.r * eye, torch.zeros_like(z[0, 0]), eye,
                             mask=mask, target=target)

    def step(self, belief, z_t, u_t=None, mask_t=None, R_t=None):
        eye = self._eye()
        belief = predict(belief, eye, self.log_q.exp() * eye)
        return belief if z_t is None else update(belief, z_t, eye, self.r * eye, mask_t)[0]

    def rollout(self, belief, actions):
        steps = actions if isinstance(actions, int) else actions.shape[1]
        h = torch.arange(1, steps + 1, dtype=self.log_q.dtype)
        cov = belief.cov[:, None] + (h * self.log_q.exp())[None, :, None, None] * self._eye()
        return Gaussian(belief.mean[:, None].expand(-1, steps, -1), cov)

    def predict_observation(self, belief, R=None):
        return Gaussian(belief.mean, belief.cov + self.r * self._eye())


@pytest.fixture
def registered(monkeypatch):
    """The new prior's one registry row and one preset row (what a contributor adds)."""
    monkeypatch.setitem(priors.PRIORS, "random_walk", RandomWalkPrior)
    monkeypatch.setitem(methods.PRESETS, "random_walk",
                        Preset("random_walk", "plugin", estimator_kwargs={"latent_norm": "whiten"},
                               objective_kwargs={"multistep_horizon": 4, "multistep_weight": 1.0}))


def test_the_built_in_priors_implement_the_interface():
    assert isinstance(make("kalman", 3).prior, StateSpacePrior)
    for name, kind in (("vicreg", TransitionPrior), ("cpc", TransitionPrior), ("ica", FactorizedPrior)):
        prior = make(name, 3).prior
        assert isinstance(prior, kind) and isinstance(prior, LatentPrior) and not isinstance(prior, StateSpacePrior)
    assert priors.prior_options("kalman") >= {"state_dim", "action_dim", "lr_multiplier"}
    assert isinstance(priors.build_prior("kalman", 3), KalmanLatentModel)
    with pytest.raises(ValueError, match="unknown prior"):
        priors.build_prior("nope", 3)


def test_a_new_state_space_prior_is_one_class_and_one_row(registered):
    torch.manual_seed(0)
    loss = make("random_walk", 3, r=0.25)
    assert isinstance(loss.prior, RandomWalkPrior) and loss.prior.r == 0.25 and loss.multistep_horizon == 4
    z = torch.randn(6, 7, 3)
    out = loss(z)
    out.loss.backward()
    assert loss.prior.log_q.grad is not None and "multistep" in out.logs
    # the alignment is the prior's exact one-step predictive log-likelihood of the whitened latents
    zw = loss.latent_norm(z, update=False)
    eye = torch.eye(3)
    ref = kalman_filter(zw, eye, eye * loss.prior.log_q.exp(), eye, 0.25 * eye, torch.zeros(3), eye)
    torch.testing.assert_close(out.alignment, ref.log_likelihood.sum().detach() / (6 * 7 * 3))

    model = WorldModel.from_config(ModelConfig(method="random_walk", encoder="mlp", input_dim=5, latent_dim=3,
                                               action_dim=0, hidden=16))
    x = torch.randn(4, 9, 5)
    model.loss(x).loss.backward()
    model.eval()
    assert model.can_filter
    with torch.no_grad():
        filtered = model.filter(x).filtered
        belief = model.init_belief(4)
        for t in range(9):
            belief = model.step(belief, x[:, t])
        torch.testing.assert_close(belief.mean, filtered.mean[:, -1])
        imagined = model.imagine(belief, 3, observe=True)  # closed form: mean stays, variance grows by q per step
        q = float(model.prior.log_q.exp())
        expected = filtered.cov[:, -1, None] + (torch.arange(1, 4) * q)[None, :, None, None] * torch.eye(3) \
            + 0.5 * torch.eye(3)
        torch.testing.assert_close(imagined.cov, expected)
        metrics = predictive_metrics(model.prior, model.encode(x), horizon=3, burn_in=2)
    assert metrics["k"] == [1, 2, 3] and all(math.isfinite(v) for v in metrics["nll"])
