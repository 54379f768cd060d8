"""The N-link arm's true dynamics in torch (simulate)."""
import numpy as np
import pytest
import torch

from worldmodel.envs import make_env
from worldmodel.envs.nlink import NLinkPendulumEnv


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
