"""The N-link arm's true dynamics in torch (simulate) and its goal-reaching API."""
import numpy as np
import pytest
import torch

from worldmodel.envs import make_env
from worldmodel.envs.nlink import NLinkPendulumEnv
from worldmodel.planning.mpc import PlannerConfig
from worldmodel.planning.solvers import mppi


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_derivative(env, y, torque):
    """The numpy derivative as it was before it learnt torch (step's arithmetic must not change)."""
    theta, omega = y[: env.n], y[env.n :]
    diff = theta[:, None] - theta[None, :]
    mass = env._mass_lengths * np.cos(diff)
    joint_rate = np.diff(omega, prepend=0.0)
    tau = torque - env.friction * joint_rate
    force = tau - np.append(tau[1:], 0.0)
    rhs = (force - (env._mass_lengths * np.sin(diff)) @ (omega**2)
           - env.gravity * env.lengths * np.sin(theta) * env._tail)
    return np.concatenate([omega, np.linalg.solve(mass, rhs)])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_derivative_numpy_unchanged_and_torch_batched(n):
    env = NLinkPendulumEnv(image_size=16, n_links=n)
    rng = np.random.default_rng(n)
    ys, us = rng.normal(0, 2, (6, 2 * n)), rng.uniform(-1.5, 1.5, (6, n))
    for y, u in zip(ys, us):
        np.testing.assert_array_equal(env.derivative(y, u), reference_derivative(env, y, u))  # bit-identical
    batched = env.derivative(torch.tensor(ys.reshape(2, 3, 2 * n)), torch.tensor(us.reshape(2, 3, n)))
    assert batched.shape == (2, 3, 2 * n) and batched.dtype == torch.float64
    expected = np.stack([reference_derivative(env, y, u) for y, u in zip(ys, us)]).reshape(2, 3, 2 * n)
    np.testing.assert_allclose(batched.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{}, {"n_links": 3, "gravity": 0.0, "friction": 0.3}])
def test_simulate_equals_step(kwargs):
    env = make_env("nlink", image_size=16, **kwargs)
    _, info = env.reset(seed=5)
    state = torch.tensor(info["state"])
    n = env.unwrapped.n
    for action in np.random.default_rng(0).uniform(-1.5, 1.5, (5, n)):  # beyond the bounds: clipped alike
        _, reward, _, _, info = env.step(action)
        state, r = env.unwrapped.simulate(state, torch.tensor(action))
        np.testing.assert_allclose(state.numpy(), info["state"], atol=1e-10, rtol=0)
        assert state.dtype == torch.float64 and float(r) == reward == 0.0


def test_simulate_batch_equals_single_calls():
    env = NLinkPendulumEnv(image_size=16)
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) * 2
    actions = torch.rand(2, 3, 2, generator=gen, dtype=torch.float64) * 2 - 1
    batch, reward = env.simulate(states, actions)
    assert batch.shape == (2, 3, 4) and reward.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batch[i, j], env.simulate(states[i, j], actions[i, j])[0], rtol=0, atol=1e-12)
    single, _ = env.simulate(states.float(), actions)  # dtype of the state
    assert single.dtype == torch.float32 and torch.allclose(single.double(), batch, atol=1e-4)


def test_static_torque_holds_the_arm_still():
    env = NLinkPendulumEnv(image_size=16, n_links=3, friction=0.0)
    theta = np.array([0.3, -0.5, 1.0])
    u = env.static_torque(theta)
    y = np.concatenate([theta, np.zeros(3)])
    np.testing.assert_allclose(env.derivative(y, u), 0.0, atol=1e-12)  # in equilibrium under u
    assert not np.allclose(env.derivative(y, 0.9 * u), 0.0)
    torch.testing.assert_close(env.static_torque(torch.tensor(theta)), torch.tensor(u))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sample_goal_can_be_held_with_gravity(n):
    env = NLinkPendulumEnv(image_size=16, n_links=n)
    rng = np.random.default_rng(0)
    goals = np.stack([env.sample_goal(rng) for _ in range(200)])
    assert goals.shape == (200, 2 * n) and np.all(goals[:, n:] == 0)
    torques = np.abs(env.static_torque(goals[:, :n]))
    assert torques.max() <= 0.8 * env.max_torque + 1e-12  # GOAL_HOLD: within the limit, with room to spare
    assert torques.max() > 0.7 * env.max_torque  # ... and the whole holdable range is used
    assert np.all(np.abs(goals[:, :n]) < np.pi / 2)  # near hanging (the stable branch)
    # held for real: from rest at the goal, its static torque keeps the arm there
    sim = make_env("nlink", image_size=16, n_links=n)
    sim.reset(options={"state": goals[0]})
    for _ in range(10):
        _, _, _, _, info = sim.step(env.static_torque(goals[0, :n]))
    assert env.goal_error(info["state"], goals[0]) < 1e-6


def test_sample_goal_without_gravity_is_uniform():
    env = NLinkPendulumEnv(image_size=16, gravity=0.0)
    goals = np.stack([env.sample_goal(np.random.default_rng(i)) for i in range(300)])
    assert np.all((goals[:, :2] >= -np.pi) & (goals[:, :2] < np.pi)) and np.all(goals[:, 2:] == 0)
    assert np.abs(goals[:, :2]).max() > 3.0 and abs(goals[:, :2].mean()) < 0.3


def test_render_state_is_the_frame_after_reset():
    env = make_env("nlink", image_size=32)
    env.reset(seed=0)
    goal = env.unwrapped.sample_goal(np.random.default_rng(1))
    before = env.unwrapped.state.copy()
    image = env.unwrapped.render_state(goal)
    np.testing.assert_array_equal(env.unwrapped.state, before)  # the env is unchanged
    frame, _ = env.reset(options={"state": goal})
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image, frame)
    two = env.unwrapped.render_state(np.stack([goal, before]))
    assert two.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(two[0], image)


def test_goal_error_wraps_and_batches():
    env = NLinkPendulumEnv(image_size=16)
    goal = np.array([3.0, -2.0, 0.0, 0.0])
    state = goal + np.array([2 * np.pi, -2 * np.pi, 0.5, -1.0])  # same pose, other velocities
    assert env.goal_error(state, goal) < 1e-12
    near = np.array([-3.0, -2.0, 0.0, 0.0])  # across the wrap: 2 pi - 6 rad apart, not 6
    assert env.goal_error(near, goal) == pytest.approx(2 * np.pi - 6.0)
    assert env.goal_error(np.array([3.3, -1.6, 0, 0]), goal) == pytest.approx(0.5)
    states = np.stack([state, near, goal])[:, None].repeat(2, 1)  # (3, 2, 4)
    errors = env.goal_error(states, goal)
    assert errors.shape == (3, 2)
    torch.testing.assert_close(env.goal_error(torch.tensor(states), torch.tensor(goal)), torch.tensor(errors))
    cost = env.goal_cost(torch.tensor(states), torch.tensor(goal))  # smooth, periodic, 0 at rest on the goal
    assert cost.shape == (3, 2) and float(cost[2, 0]) == 0.0 and float(cost[0, 0]) == pytest.approx(0.01 * 1.25)


def test_control_task_is_declared():
    control = NLinkPendulumEnv.defaults["control"]
    assert control["task"] == "goal" and control["env_kwargs"]["gravity"] == 0.0
    assert control["episode_length"] >= 50 and 0 < control["success_error"] < 1
    assert NLinkPendulumEnv.defaults["env_kwargs"] == {}  # training data unchanged
    make_env("nlink", image_size=16, **control["env_kwargs"])
    PlannerConfig.from_overrides(control["planner"])


def test_true_state_planning_reaches_towards_the_goal():
    """A few receding-horizon MPPI steps on the true dynamics shrink the goal error (the control task's arm, with
    2 RK4 substeps to keep the test fast)."""
    control = NLinkPendulumEnv.defaults["control"]
    env = make_env("nlink", image_size=16, **{**control["env_kwargs"], "substeps": 2})
    arm = env.unwrapped
    _, info = env.reset(seed=0, options={"state": np.zeros(4)})
    goal = np.array([0.8, -0.4, 0.0, 0.0])
    goal_t, low = torch.tensor(goal), torch.full((2,), -arm.max_torque, dtype=torch.float64)

    def cost(state, actions):
        s, total = state[:, None].expand(-1, actions.shape[1], -1), actions.new_zeros(actions.shape[:2])
        for h in range(actions.shape[2]):
            s, _ = arm.simulate(s, actions[:, :, h])
            total = total + arm.goal_cost(s, goal_t)
        return total

    gen, plan = torch.Generator().manual_seed(0), torch.zeros(1, 8, 2, dtype=torch.float64)
    start = arm.goal_error(info["state"], goal)
    for _ in range(15):
        state = torch.tensor(info["state"])[None]
        plan = mppi(lambda a: cost(state, a), torch.cat([plan[:, 1:], plan[:, -1:]], 1), low, -low, samples=32,
                    iterations=2, generator=gen)
        _, _, _, _, info = env.step(plan[0, 0].numpy())
    assert arm.goal_error(info["state"], goal) < 0.3 * start
