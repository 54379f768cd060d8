"""Environments: determinism under seed, true state matches the physics, rendering sensitivity."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from worldmodel.envs import make_env


def rollout(env, actions, seed):
    obs, info = env.reset(seed=seed)
    frames, states = [obs], [info["state"]]
    for a in actions:
        obs, _, _, _, info = env.step(a)
        frames.append(obs)
        states.append(info["state"])
    return np.stack(frames), np.stack(states)


@pytest.mark.parametrize("name", ["pendulum"])
def test_deterministic_under_seed(name):
    env = make_env(name, image_size=32)
    actions = [env.action_space.sample() for _ in range(20)]
    f1, s1 = rollout(env, actions, seed=3)
    f2, s2 = rollout(make_env(name, image_size=32), actions, seed=3)
    f3, s3 = rollout(env, actions, seed=4)
    assert f1.dtype == np.uint8 and f1.shape == (21, 32, 32, 3)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(s1, s2)
    assert not np.allclose(s1[0], s3[0])


def test_pendulum_small_angle_matches_damped_oscillator_closed_form():
    # m l^2 theta'' = -b theta' - m g l theta  (linearised), theta(0) = a, theta'(0) = 0
    b, g, theta0 = 0.3, 9.81, 1e-3
    env = make_env("pendulum", image_size=16, friction=b, substeps=8)
    env.reset(seed=0, options={"state": (theta0, 0.0)})
    t = 0.05 * np.arange(1, 101)
    zeta_w = b / 2
    wd = np.sqrt(g - zeta_w**2)
    expected = theta0 * np.exp(-zeta_w * t) * (np.cos(wd * t) + zeta_w / wd * np.sin(wd * t))
    got = np.array([env.step(np.zeros(1, np.float32))[4]["state"][0] for _ in t])
    # nonlinearity contributes O(theta0^3); integration error is far below 1e-3 relative
    np.testing.assert_allclose(got, expected, atol=theta0 * 1e-3)


def test_pendulum_state_matches_independent_fine_integration():
    """Large swings under torque against a float64 semi-implicit Euler with 2000 substeps per step."""
    env = make_env("pendulum", image_size=16, friction=0.2)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-2, 2, size=(60, 1)).astype(np.float32)
    _, states = rollout(env, actions, seed=5)
    theta, omega = states[0]
    h = 0.05 / 2000
    for k, u in enumerate(actions[:, 0].astype(np.float64)):
        for _ in range(2000):
            omega += h * (u - 0.2 * omega - 9.81 * np.sin(theta))
            theta += h * omega
        wrapped = (theta + np.pi) % (2 * np.pi) - np.pi
        assert abs(np.sin(wrapped - states[k + 1, 0])) < 2e-3 and abs(omega - states[k + 1, 1]) < 5e-3


def test_frictionless_pendulum_conserves_energy_with_friction_dissipating():
    env = make_env("pendulum", image_size=16, friction=0.0)
    _, states = rollout(env, np.zeros((1000, 1), np.float32), seed=1)
    energy = env.unwrapped.energy(states)
    assert np.ptp(energy) / energy[0] < 1e-4  # 50 s of free swinging
    damped = make_env("pendulum", image_size=16, friction=0.1)
    _, states = rollout(damped, np.zeros((200, 1), np.float32), seed=1)
    assert np.all(np.diff(damped.unwrapped.energy(states)) <= 1e-9)


@pytest.mark.parametrize("size", [64, 16])
def test_pendulum_render_resolves_small_angle_changes(size):
    env = make_env("pendulum", image_size=size)
    frames = [env.reset(options={"state": (a, 0.0)})[0].astype(int) for a in (0.3, 0.3 + 0.02)]
    assert np.abs(frames[0] - frames[1]).max() >= 8
    assert frames[0].max() == 255 and frames[0].min() == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown env name"):
        make_env("nope")
    with pytest.raises(ValueError, match="image_size"):
        make_env("pendulum", image_size=(3, 3, 3))
    env = make_env("pendulum", image_size=16)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(np.array([np.nan], np.float32))


def test_top_level_folders_do_not_shadow_global_packages(tmp_path):
    code = (
        "import importlib.util, json;"
        "import worldmodel.envs, worldmodel.datasets;"
        "spec = [importlib.util.find_spec(n) for n in ('datasets', 'envs')];"
        "print(json.dumps([s.origin if s else None for s in spec]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    assert repo not in out.stdout, out.stdout
    assert importlib.util.find_spec("worldmodel.envs").origin.startswith(repo)
