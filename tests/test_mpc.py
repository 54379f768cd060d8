"""MPC in the latent space of a WorldModel, the reward head, candidate rollouts and the pendulum's true dynamics."""

import numpy as np
import pytest
import torch

from worldmodel.kalman import Gaussian
from worldmodel.model import ModelConfig, WorldModel
from worldmodel.planning import MPC, PlannerConfig, QuadraticCost, RewardHead, ValueHead, fit_reward_head, lqr
from worldmodel.planning.reward import VALUE_TAIL, discounted_returns
from worldmodel.priors.base import StateSpacePrior

DTYPES = [torch.float32, torch.float64]
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add synchronisation
BOUNDS = {"action_low": [-1.0], "action_high": [1.0]}


def _model(dtype=torch.float64, **kw) -> WorldModel:
    """A 2-d latent model over 3-d vector observations with a known controllable linear prior (S = L = 2):
    h' = A h + G u, A a slow rotation, G = (0, 0.3)."""
    torch.manual_seed(0)
    config = ModelConfig(**{"encoder": "mlp", "input_dim": 3, "latent_dim": 2, "state_dim": 2, "action_dim": 1,
                            "multistep_horizon": 0, "planner": BOUNDS, **kw})
    model = WorldModel.from_config(config).to(dtype).eval()
    with torch.no_grad():
        angle = torch.tensor(0.2, dtype=dtype)
        c, s = torch.cos(angle), torch.sin(angle)
        if model.prior.state_dim == 2 and model.config.action_dim == 1:
            model.prior.A_raw.copy_(0.98 * torch.stack([torch.stack([c, -s]), torch.stack([s, c])]))
            model.prior.G.copy_(torch.tensor([[0.0], [0.3]], dtype=dtype))
            model.prior.b.zero_()
        else:  # random transition, control and bias
            model.prior.G.normal_(), model.prior.b.normal_()
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_candidate_rollout_equals_rollout_of_each_candidate(dtype):
    """The shared-covariance fast path (KalmanLatentModel) and the generic path (StateSpacePrior) both equal
    `rollout` run on every candidate alone."""
    model = _model(dtype, state_dim=4)
    prior = model.prior
    g = torch.Generator().manual_seed(1)
    belief = Gaussian(torch.randn(2, 4, generator=g, dtype=dtype), prior.init_belief(2).cov)
    actions = torch.randn(2, 3, 5, 1, generator=g, dtype=dtype)
    fast = prior.candidate_rollout(belief, 5)(actions)
    generic = StateSpacePrior.candidate_rollout(prior, belief, 5)(actions)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for b in range(2):
        for n in range(3):
            one = prior.rollout(Gaussian(belief.mean[b:b + 1], belief.cov[b:b + 1]), actions[b:b + 1, n])
            torch.testing.assert_close(fast.mean[b, n], one.mean[0], atol=tol, rtol=tol)
            torch.testing.assert_close(fast.cov[b, 0], one.cov[0], atol=tol, rtol=tol)
            torch.testing.assert_close(generic.mean[b, n], one.mean[0], atol=tol, rtol=tol)
            torch.testing.assert_close(generic.cov[b, n], one.cov[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("a", [2, 0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reward_head_fit_recovers_a_quadratic_reward(dtype, a):
    """Noise-free rewards E r under known coefficients: the least-squares fit returns them (R^2 = 1), and
    `expected` equals the closed form r(m, u) + tr(Whh P) computed densely; a = 0: the value head's V(h)."""
    g = torch.Generator().manual_seed(2)
    S, N = 3, 400
    truth = (RewardHead(S, a) if a else ValueHead(S)).to(dtype)
    W = torch.randn(S + a, S + a, generator=g, dtype=dtype)
    W = W + W.mT
    truth.Whh.copy_(W[:S, :S]), truth.Whu.copy_(W[:S, S:]), truth.Wuu.copy_(W[S:, S:])
    truth.wh.copy_(torch.randn(S, generator=g)), truth.wu.copy_(torch.randn(a, generator=g)), truth.c0.fill_(0.7)
    truth.fitted.fill_(True)
    L = torch.randn(N, S, S, generator=g, dtype=dtype) * 0.3
    belief = Gaussian(torch.randn(N, S, generator=g, dtype=dtype), L @ L.mT)
    u = torch.randn(N, a, generator=g, dtype=dtype)
    x = torch.cat([belief.mean, u], 1)
    dense = (x @ W * x).sum(1) + belief.mean @ truth.wh + u @ truth.wu + 0.7 + \
        torch.einsum("nij,ji->n", belief.cov, W[:S, :S])
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(truth.expected(belief, u), dense, atol=tol, rtol=tol)
    if not a:
        torch.testing.assert_close(truth.value(belief), dense, atol=tol, rtol=tol)
    head = (RewardHead(S, a) if a else ValueHead(S)).to(dtype)
    r2 = head.fit(belief, u, dense, ridge=0.0)
    assert r2 > 1 - 1e-8
    for name in ("Whh", "Whu", "Wuu", "wh", "wu", "c0"):
        torch.testing.assert_close(getattr(head, name), getattr(truth, name), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_discounted_returns_match_the_dense_sum(dtype):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 17, generator=g, dtype=dtype)
    T = rewards.shape[1]
    weights = torch.tensor([[0.9 ** (j - t) if j >= t else 0.0 for j in range(T)] for t in range(T)], dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(discounted_returns(rewards, 0.9), rewards @ weights.mT, atol=tol, rtol=tol)


def test_value_head_fit_is_least_squares_on_the_returns_of_untruncated_steps():
    """fit_reward_head's value head against a dense float64 least-squares fit computed here: the targets are the
    discounted returns from each k-step predictive belief, only of steps the episode goes on long enough after
    (the tail weight below VALUE_TAIL); too short episodes leave the head unfitted."""
    model = _model(reward_head=True, value_discount=0.8)
    g = torch.Generator().manual_seed(1)
    N, T, horizon = 3, 40, 3
    data = {"obs": torch.randn(N, T, 3, generator=g, dtype=torch.float64),
            "action": torch.rand(N, T, 1, generator=g, dtype=torch.float64) * 2 - 1,
            "reward": torch.randn(N, T, generator=g, dtype=torch.float64), "mask": torch.ones(N, T, dtype=torch.bool)}
    data["mask"][2, 30:] = False  # a shorter episode: 30 steps
    r2 = fit_reward_head(model, data, horizon=horizon)
    assert set(r2) == {"reward", "value"} and bool(model.value_head.fitted)
    tail = int(np.ceil(np.log(VALUE_TAIL) / np.log(0.8)))  # 14 steps
    filtered = model.filter(data["obs"], data["action"], data["mask"]).filtered
    X, y = [], []
    for n in range(N):
        length = int(data["mask"][n].sum())
        returns = [sum(0.8 ** (j - t) * float(data["reward"][n, j]) for j in range(t, length)) for t in range(T)]
        for t in range(T - 1):
            for k in range(1, horizon + 1):
                if t + k + tail <= length:
                    start = Gaussian(filtered.mean[n, t:t + 1], filtered.cov[n, t:t + 1])
                    state = model.prior.rollout(start, data["action"][n, t:t + k][None].double())
                    m, P = state.mean[0, -1].detach(), state.cov[0, -1].detach()
                    second = (torch.outer(m, m) + P)[torch.triu_indices(2, 2).unbind()]
                    X.append(torch.cat([second, m, m.new_ones(1)]))
                    y.append(returns[t + k])
    X, y = torch.stack(X), torch.tensor(y, dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    head = model.value_head
    torch.testing.assert_close(torch.stack([head.Whh[0, 0], 2 * head.Whh[0, 1], head.Whh[1, 1], *head.wh, head.c0]),
                               coef, atol=1e-4, rtol=1e-4)
    short = _model(reward_head=True, value_discount=0.8)
    cut = {k: v[:, :tail] for k, v in data.items()}
    assert np.isnan(fit_reward_head(short, cut, horizon=horizon)["value"]) and not bool(short.value_head.fitted)


def test_mpc_adds_the_value_head_at_the_horizon():
    """With a zero reward and a value V(h) = h_2, the plan's expected cost is -value_weight E V(h_H) and MPPI drives
    h_2 up (the input G = (0, 0.3) acts on it); value_weight=0 drops it; lqr refuses a terminal value; a checkpoint
    written before value heads loads with an unfitted one."""
    model = _model(reward_head=True)
    with torch.no_grad():
        model.reward_head.fitted.fill_(True)  # all-zero reward
        model.value_head.wh.copy_(torch.tensor([0.0, 1.0], dtype=torch.float64)), model.value_head.fitted.fill_(True)
    mpc = MPC(model, horizon=5, samples=64, value_weight=2.0)
    belief = model.init_belief(1)
    actions = torch.rand(1, 8, 5, 1, dtype=torch.float64)
    states = model.prior.candidate_rollout(belief, 5)(actions)
    torch.testing.assert_close(mpc._expected_cost(states, actions), -2.0 * states.mean[..., -1, 1])
    assert float(mpc.act(belief)) > 0.9  # pushes h_2 up as hard as the bound allows
    assert MPC(model, horizon=5, value_weight=0.0).terminal is None
    with pytest.raises(ValueError, match="terminal value"):
        MPC(model, solver="lqr")
    MPC(model, solver="lqr", value_weight=0.0)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("value_head.")}
    fresh = WorldModel.from_config(model.config)
    fresh.load_weights(old)
    assert not bool(fresh.value_head.fitted) and MPC(fresh).terminal is None


def test_world_model_reward_is_the_head_under_the_predicted_belief():
    model = _model(reward_head=True)
    head = model.reward_head
    with torch.no_grad():
        head.Whh.copy_(-torch.eye(2, dtype=torch.float64)), head.wu.fill_(0.5), head.fitted.fill_(True)
    belief = model.init_belief(3)
    action = torch.tensor([[1.0], [0.0], [-1.0]], dtype=torch.float64)
    predicted = model.prior.step(belief, None, action)
    expected = -(predicted.mean.square().sum(1) + predicted.cov.diagonal(0, 1, 2).sum(1)) + 0.5 * action[:, 0]
    torch.testing.assert_close(model.reward(belief, action), expected)
    with pytest.raises(ValueError, match="shape"):
        model.reward(belief, action[:2])


@pytest.mark.parametrize("solver", ["lqr", "mppi", "cem"])
def test_mpc_reaches_a_goal_in_the_latent_space(solver):
    """Closed loop on the model's own linear dynamics (prediction only): the goal frame's latent is reached,
    by every solver; the LQR plan equals planning.lqr on the prior's transition."""
    model = _model()
    goal = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    with torch.no_grad():
        z_goal = model.encode(goal[None, None])[0, 0]
        model.prior.b.copy_(z_goal)  # h = b is the resting state: a reachable goal (one input holds only a line)
    mpc = MPC(model, goal=goal, solver=solver, horizon=15, samples=128, iterations=8)
    belief = Gaussian(*(x.detach() for x in model.init_belief(1)))
    start = float((belief.mean[0] @ model.prior.C.mT - z_goal).norm())
    for _ in range(40):
        action = mpc.act(belief)
        assert action.shape == (1,) and -1 <= float(action) <= 1
        with torch.no_grad():
            belief = model.prior.step(belief, None, action[None])
    final = float((belief.mean[0] @ model.prior.C.mT - z_goal).norm())
    assert final < (0.01 if solver == "lqr" else 0.1) * start  # sampling keeps a std floor of 5 % of the range
    if solver == "lqr":
        A, G, c = model.prior.transition()
        cost = QuadraticCost.goal(model.prior.C, z_goal)
        torch.testing.assert_close(mpc.plan(belief), lqr(A, G, cost, belief.mean, 15, c, -1.0, 1.0))


def test_mpc_bad_input_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="goal must be one frame"):
        MPC(model, goal=torch.zeros(4))
    with pytest.raises(ValueError, match="needs a cost"):
        MPC(model)
    mpc = MPC(model, goal=torch.zeros(3))
    bad = model.init_belief(1)
    with pytest.raises(ValueError, match="not finite"):
        mpc.act(Gaussian(bad.mean * float("nan"), bad.cov))
    with pytest.raises(ValueError, match="shape"):
        mpc.act(Gaussian(bad.mean[:, :1], bad.cov))
    with pytest.raises(ValueError, match="unknown planner"):
        MPC(model, goal=torch.zeros(3), horizn=3)
    with pytest.raises(ValueError, match="action bounds"):
        MPC(_model(planner={}), goal=torch.zeros(3))
    with pytest.raises(ValueError, match="trained with actions"):
        MPC(_model(action_dim=0, planner={}), goal=torch.zeros(3))
    with pytest.raises(TypeError, match="state-space prior"):
        MPC(WorldModel.from_config(ModelConfig(encoder="mlp", input_dim=3, latent_dim=2, method="vicreg")))
    with pytest.raises(ValueError, match="lqr"):
        MPC(model, cost=lambda m, P, u: m.sum((-1, -2)), solver="lqr")
    with pytest.raises(ValueError, match="planner"):
        PlannerConfig(action_low=(1.0,), action_high=(-1.0,))


def test_custom_cost_sees_candidates_and_shared_covariances():
    model = _model()
    seen = {}

    def cost(means, covs, actions):
        seen.update(means=means.shape, covs=covs.shape, actions=actions.shape)
        return (means[..., 0] - 1).square().sum(-1)

    MPC(model, cost=cost, horizon=7, samples=16, elites=4).act(model.init_belief(2))
    assert seen == {"means": (2, 16, 7, 2), "covs": (2, 1, 7, 2, 2), "actions": (2, 16, 7, 1)}


def test_pendulum_simulate_equals_step():
    from worldmodel.envs import make_env

    env = make_env("pendulum", image_size=16)
    _, info = env.reset(seed=3)
    state = torch.tensor(info["state"])
    for a in (1.5, -3.0, 0.25, 0.0):
        _, reward, _, _, info = env.step(np.array([a]))
        state, r = env.unwrapped.simulate(state, torch.tensor([a], dtype=torch.float64))
        np.testing.assert_allclose(state.numpy(), info["state"], atol=1e-12)
        assert abs(float(r) - reward) < 1e-12


def test_planning_threads_one_for_small_plans_all_for_large():
    from worldmodel.planning.mpc import SMALL_PLAN, planning_threads

    threads, cpu = torch.get_num_threads(), torch.device("cpu")
    with planning_threads(cpu, 256, 16):  # one belief of the default model
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    with planning_threads(cpu, SMALL_PLAN // 16, 16):  # e.g. 4 beliefs x 256 samples x 16
        assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError), planning_threads(cpu, 1, 1):
        raise RuntimeError
    assert torch.get_num_threads() == threads
