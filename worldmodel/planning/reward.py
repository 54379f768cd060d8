"""The reward and value heads: an expected reward quadratic in the latent state and the action, and a terminal value
quadratic in the state, both exact under a Gaussian belief.

    r(h, u) = h^T Whh h + 2 h^T Whu u + u^T Wuu u + wh^T h + wu^T u + c0
    E_{h ~ N(m, P)} r(h, u) = r(m, u) + tr(Whh P)

The stored reward of step t is the one earned by action u_t from frame t, i.e. a function of the next state
h_{t+1} and u_t. So the head is fitted on the filter's one-step *predictive* beliefs N(m_{t+1|t}, P_{t+1|t})
(exactly what `WorldModel.reward(belief, action)` and a planner's rollout produce): the expectation above is
linear in the coefficients, with features (m m^T + P, m u^T, u u^T, m, u, 1), so the fit is one ridge
least-squares solve in float64 (no learning rate, no epochs, exact for the data given).

The value head V(h) = h^T Whh h + wh^T h + c0 (a reward head without actions) estimates the discounted return
sum_j discount^j r_{t+j} of the data's policies from the belief of step t, fitted the same way (Monte Carlo returns
as targets). A planner adds it at the end of its horizon (`PlannerConfig.value_weight`), so that a plan sees
what its last state is worth beyond the horizon (TD-MPC2's terminal value; for the pendulum: the energy it has
pumped, quadratic in (cos, sin, velocity)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from worldmodel.kalman import Gaussian
from worldmodel.planning.costs import QuadraticCost

__all__ = ["RewardHead", "ValueHead", "fit_reward_head"]


def _quadratic_features(belief: Gaussian, actions: Tensor) -> Tensor:
    """Features (N, F) whose linear map is the expected reward: upper triangles of m m^T + P and u u^T, m u^T, m,
    u, 1, from beliefs mean (N, S), cov (N, S, S) and actions (N, a)."""
    m, P, u = belief.mean, belief.cov, actions
    S, a = m.shape[-1], u.shape[-1]
    iu_h = torch.triu_indices(S, S, device=m.device)
    iu_a = torch.triu_indices(a, a, device=m.device)
    second = (m[:, :, None] * m[:, None, :] + P)[:, iu_h[0], iu_h[1]]
    actions2 = (u[:, :, None] * u[:, None, :])[:, iu_a[0], iu_a[1]]
    cross = (m[:, :, None] * u[:, None, :]).flatten(1)
    return torch.cat([second, cross, actions2, m, u, torch.ones_like(m[:, :1])], 1)


def _symmetric(coef: Tensor, n: int) -> Tensor:
    """The symmetric W (n, n) with x^T W x = sum_{i <= j} coef_ij x_i x_j (coef over the upper triangle)."""
    iu = torch.triu_indices(n, n, device=coef.device)
    W = coef.new_zeros(n, n)
    W[iu[0], iu[1]] = coef
    return (W + W.mT) / 2


class RewardHead(nn.Module):
    """Quadratic expected-reward model over states (S,) and actions (a,) (see the module docstring).

    Coefficients are buffers (saved with the model, never trained by gradient); `fitted` is False until `fit`.
    With action_dim 0 it is a function of the state alone (`ValueHead`).
    """

    def __init__(self, state_dim: int, action_dim: int):
        super().__init__()
        if state_dim < 1 or action_dim < 0:
            raise ValueError(f"a reward head needs state_dim >= 1 and action_dim >= 0, got {state_dim}, {action_dim}")
        self.state_dim, self.action_dim = state_dim, action_dim
        S, a = state_dim, action_dim
        for name, shape in (("Whh", (S, S)), ("Whu", (S, a)), ("Wuu", (a, a)), ("wh", (S,)), ("wu", (a,)), ("c0", ())):
            self.register_buffer(name, torch.zeros(shape))
        self.register_buffer("fitted", torch.tensor(False))

    def cost(self) -> QuadraticCost:
        """The planning cost: minus the reward, as a `QuadraticCost` (its `stage` is -E r exactly)."""
        if not bool(self.fitted):
            raise ValueError(f"the {type(self).__name__} is not fitted: train the model on data with rewards "
                             "(ModelConfig.reward_head=True fits it after training)")
        actions = self.action_dim > 0
        return QuadraticCost(-self.Whh, -self.Wuu if actions else None, -self.Whu if actions else None, -self.wh,
                             -self.wu if actions else None, -self.c0)

    def expected(self, belief: Gaussian, actions: Tensor) -> Tensor:
        """E r(h, u) under h ~ belief: mean (B, S), cov (B, S, S), actions (B, a) -> (B,)."""
        return -self.cost().stage(belief.mean[:, None], actions[:, None], belief.cov[:, None])[:, 0]

    @torch.no_grad()
    def fit(self, belief: Gaussian, actions: Tensor, rewards: Tensor, ridge: float = 1e-6) -> float:
        """Least-squares fit of E r to observed rewards: predictive beliefs mean (N, S), cov (N, S, S) of the state
        reached by actions (N, a), rewards (N,). Ridge `ridge` relative to the mean feature variance. Returns the
        fit's R^2 on these samples."""
        N = rewards.shape[0]
        if belief.mean.shape != (N, self.state_dim) or actions.shape != (N, self.action_dim):
            raise ValueError(f"fit needs beliefs (N, {self.state_dim}), actions (N, {self.action_dim}) and rewards "
                             f"(N,); got {tuple(belief.mean.shape)}, {tuple(actions.shape)}, {tuple(rewards.shape)}")
        if N < 2 or not (torch.isfinite(rewards).all() and torch.isfinite(belief.mean).all()):
            raise ValueError(f"fit needs at least 2 finite samples, got {N}")
        X = _quadratic_features(Gaussian(belief.mean.double(), belief.cov.double()), actions.double())
        y = rewards.double()
        scale = X[:, :-1].std(0).clamp_min(1e-12)  # standardise all but the constant column
        Xs = torch.cat([(X[:, :-1] - X[:, :-1].mean(0)) / scale, torch.ones_like(X[:, -1:])], 1)
        gram = Xs.mT @ Xs
        reg = ridge * N * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        reg[-1, -1] = 0.0
        coef_s = torch.linalg.solve(gram + reg, Xs.mT @ y)
        coef = torch.cat([coef_s[:-1] / scale, (coef_s[-1] - (coef_s[:-1] / scale) @ X[:, :-1].mean(0))[None]])
        S, a = self.state_dim, self.action_dim
        sizes = [S * (S + 1) // 2, S * a, a * (a + 1) // 2, S, a, 1]
        hh, hu, uu, h, u, c = coef.split(sizes)
        values = {"Whh": _symmetric(hh, S), "Whu": hu.reshape(S, a) / 2, "Wuu": _symmetric(uu, a), "wh": h, "wu": u,
                  "c0": c[0]}
        for name, value in values.items():
            getattr(self, name).copy_(value)
        self.fitted.fill_(True)
        residual = y - X @ coef
        return float(1.0 - residual.square().mean() / y.var(unbiased=False).clamp_min(1e-300))


class ValueHead(RewardHead):
    """Quadratic terminal value V(h) of the state (S,), E V under N(m, P) = V(m) + tr(Whh P) exact; `discount` (a
    buffer, saved with the model) is the discount of the returns it was fitted to (`fit_reward_head`)."""

    def __init__(self, state_dim: int, discount: float = 0.95):
        super().__init__(state_dim, 0)
        if not 0 < discount < 1:
            raise ValueError(f"the value head's discount must be in (0, 1), got {discount}")
        self.register_buffer("discount", torch.tensor(float(discount)))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """A checkpoint written before value heads has none of this head's entries: keep it unfitted (the planner
        then adds no terminal value)."""
        if not any(key.startswith(prefix) for key in state_dict):
            state_dict.update({prefix + name: value for name, value in self.state_dict().items()})
        super()._load_from_state_dict(state_dict, prefix, *args)

    def value(self, belief: Gaussian) -> Tensor:
        """E V(h) under h ~ belief: mean (B, S), cov (B, S, S) -> (B,)."""
        return self.expected(belief, belief.mean.new_zeros(belief.mean.shape[0], 0))


def discounted_returns(rewards: Tensor, discount: float) -> Tensor:
    """G_t = sum_{j >= t} discount^(j - t) r_j along the last axis of rewards (..., T) (the episode's rewards only:
    those after its end count as 0)."""
    returns, running = torch.empty_like(rewards), rewards.new_zeros(rewards.shape[:-1])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + discount * running
        returns[..., t] = running
    return returns


VALUE_TAIL = 0.05  # a value target is used when the discounted weight of the steps after the episode is below this


@torch.no_grad()
def fit_reward_head(model, data: dict[str, Tensor], horizon: int = 10, batch_size: int = 32,
                    max_samples: int = 200_000) -> dict[str, float]:
    """Fit `model.reward_head` and, when the model has one, `model.value_head` (in eval mode) to whole episodes
    `data` (obs (N, T, ...), action (N, T, a), reward (N, T), mask (N, T)), where the planner evaluates them: on the
    model's own k-step predictive beliefs.

    From the filtered belief of every step t (every `stride`-th one, so that at most `max_samples` samples are
    used), the prior's `rollout` under the actions taken gives the beliefs of steps t + k, k = 1..horizon; the
    reward of step t + k - 1 (earned by action t + k - 1) is regressed on the belief of step t + k and that action.
    Fitting on one-step beliefs only leaves the quadratic head unconstrained in directions the data does not
    excite, where k-step rollouts go (measured on the pendulum: the rank correlation of planned and true returns of
    random 5-step action sequences was -0.73 with one-step beliefs, 0.99 with horizon 10). The value head regresses
    the discounted return from step t + k on the same beliefs, where the episode goes on long enough for the
    truncated tail to weigh less than VALUE_TAIL (the last ~59 steps at discount 0.95 are left out). Returns the
    fits' R^2: {"reward": ..., "value": ...} (value only with a value head; nan, the head left unfitted, when no
    episode is long enough)."""
    device = next(model.parameters()).device
    prior, (episodes, steps) = model.prior, data["reward"].shape
    value_head = model.value_head
    horizon = max(1, min(horizon, steps - 1))
    stride = max(1, -(-episodes * steps * horizon // max_samples))
    starts = torch.arange(0, steps - 1, stride, device=device)
    times = starts[:, None] + torch.arange(1, horizon + 1, device=device)  # (S, K) the predicted steps
    valid, times = times < steps, times.clamp(max=steps - 1)
    if value_head is not None:
        discount = float(value_head.discount)
        tail = math.ceil(math.log(VALUE_TAIL) / math.log(discount))  # steps the episode must go on after t + k
        step = torch.arange(steps, device=device)
    samples: dict[str, list[Tensor]] = {k: [] for k in ("mean", "cov", "action", "reward", "value_keep", "return")}
    for i in range(0, episodes, batch_size):
        part = {k: data[k][i:i + batch_size].to(device) for k in ("obs", "action", "reward", "mask")}
        filtered = model.filter(part["obs"], part["action"], part["mask"]).filtered
        belief = Gaussian(filtered.mean[:, starts].flatten(0, 1), filtered.cov[:, starts].flatten(0, 1))
        taken = part["action"][:, times - 1]  # (B, S, K, a): action t + k - 1 leads into step t + k
        states = prior.rollout(belief, taken.flatten(0, 1).to(belief.mean.dtype))
        keep = valid & part["mask"][:, times]  # (B, S, K): an observed step inside the episode
        samples["mean"].append(states.mean.unflatten(0, keep.shape[:2])[keep])
        samples["cov"].append(states.cov.unflatten(0, keep.shape[:2])[keep])
        samples["action"].append(taken[keep])
        samples["reward"].append(part["reward"][:, times - 1][keep])
        if value_head is not None:
            length = torch.where(part["mask"], step + 1, 0).amax(1)  # (B,) the episodes' lengths
            inside = step < length[:, None]
            returns = discounted_returns(torch.where(inside, part["reward"].double(), 0.0), discount)[:, times]
            samples["value_keep"].append((times + tail <= length[:, None, None])[keep])
            samples["return"].append(returns[keep])
    joined = {k: torch.cat(v) for k, v in samples.items() if v}
    belief = Gaussian(joined["mean"], joined["cov"])
    r2 = {"reward": model.reward_head.fit(belief, joined["action"], joined["reward"])}
    if value_head is not None:
        use, r2["value"] = joined["value_keep"], math.nan  # nan: too short episodes, the head stays unfitted
        if int(use.sum()) >= 2:
            r2["value"] = value_head.fit(Gaussian(belief.mean[use], belief.cov[use]),
                                         belief.mean.new_zeros(int(use.sum()), 0), joined["return"][use])
    return r2
