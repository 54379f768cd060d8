"""MPC in the latent space of a WorldModel, the reward head, candidate rollouts and the pendulum's true dynamics."""

import numpy as np
import pytest
import torch

from worldmodel.kalman import Gaussian
from worldmodel.model import ModelConfig, WorldModel
from worldmodel.planning import MPC, PlannerConfig, QuadraticCost, RewardHead, lqr
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_reward_head_fit_recovers_a_quadratic_reward(dtype):
    """Noise-free rewards E r under known coefficients: the least-squares fit returns them (R^2 = 1), and
    `expected` equals the closed form r(m, u) + tr(Whh P) computed densely."""
    g = torch.Generator().manual_seed(2)
    S, a, N = 3, 2, 400
    truth = RewardHead(S, a).to(dtype)
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
    head = RewardHead(S, a).to(dtype)
    r2 = head.fit(belief, u, dense, ridge=0.0)
    assert r2 > 1 - 1e-8
    for name in ("Whh", "Whu", "Wuu", "wh", "wu", "c0"):
        torch.testing.assert_close(getattr(head, name), getattr(truth, name), atol=1e-6, rtol=1e-6)


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
