"""Environments: determinism under seed, true state matches the physics, rendering sensitivity, training
defaults and readout targets."""

import importlib.util
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
import torch

from worldmodel.datasets.collect import action_vector
from worldmodel.encoders import ConvEncoder
from worldmodel.envs import ENV_IDS, GYM_PIXEL_ENVS, env_defaults, make_env, readout_targets


def rollout(env, actions, seed):
    obs, info = env.reset(seed=seed)
    frames, states = [obs], [info["state"]]
    for a in actions:
        obs, _, _, _, info = env.step(a)
        frames.append(obs)
        states.append(info["state"])
    return np.stack(frames), np.stack(states)


ALL = ["pendulum", "balls", "nlink", "dot_figure8", "dot_square", "dot_swirl"]
NOISY = dict(pixel_noise=0.05, correlated_noise=0.2, drop_prob=0.3)


@pytest.mark.parametrize("name, noise", [(n, {}) for n in ALL] + [("pendulum", NOISY)])
def test_deterministic_under_seed(name, noise):
    env = make_env(name, image_size=32, **noise)
    actions = [env.action_space.sample() for _ in range(20)]
    f1, s1 = rollout(env, actions, seed=3)
    f2, s2 = rollout(make_env(name, image_size=32, **noise), actions, seed=3)
    f3, s3 = rollout(env, actions, seed=4)
    f4, s4 = rollout(gymnasium.make(env.spec), actions, seed=3)  # the spec (with wrappers) rebuilds the env
    assert f1.dtype == np.uint8 and f1.shape == (21, 32, 32, 3)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(f1, f4)
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


# ---------------------------------------------------------------- bouncing balls
def test_single_ball_matches_closed_form_reflections():
    r, dt = 0.2, 0.1
    env = make_env("balls", image_size=16, n_balls=1, radius=r, dt=dt)
    p0, v0 = np.array([0.1, -0.3]), np.array([0.93, -0.71])
    env.reset(options={"state": np.concatenate([p0, v0])})
    lo, hi = -1 + r, 1 - r
    for k in range(1, 200):
        state = env.step(np.zeros(0, np.float32))[4]["state"]
        # unfolded free flight, folded back into [lo, hi] (a triangle wave)
        u = (p0 + v0 * k * dt - lo) % (2 * (hi - lo))
        expected = lo + np.where(u > hi - lo, 2 * (hi - lo) - u, u)
        np.testing.assert_allclose(state[:2], expected, atol=1e-9)
        np.testing.assert_allclose(np.abs(state[2:]), np.abs(v0), atol=1e-12)


def test_head_on_collision_exchanges_velocities():
    env = make_env("balls", image_size=16, n_balls=2, radius=0.1, dt=0.1)
    env.reset(options={"state": [-0.5, 0.0, 0.5, 0.0, 1.0, 0.0, -0.5, 0.0]})
    for _ in range(6):  # surfaces meet after 0.8 / 1.5 s
        state = env.step(np.zeros(0, np.float32))[4]["state"]
    np.testing.assert_allclose(state[4:], [-0.5, 0.0, 1.0, 0.0], atol=1e-12)
    # contact at t = 0.8 / 1.5 at x = -0.5 + 0.8 / 1.5 = 0.0333 for ball 1; afterwards they move apart
    t_hit = 0.8 / 1.5
    np.testing.assert_allclose(state[0], -0.5 + t_hit - 0.5 * (0.6 - t_hit), atol=1e-12)


def test_three_balls_conserve_kinetic_energy_through_collisions():
    env = make_env("balls", image_size=16, n_balls=3, radius=0.25, max_speed=2.0)
    _, states = rollout(env, np.zeros((300, 0), np.float32), seed=0)
    kinetic = env.unwrapped.kinetic_energy(states)
    np.testing.assert_allclose(kinetic, kinetic[0], rtol=1e-12)
    speeds = np.linalg.norm(states[:, 6:].reshape(-1, 3, 2), axis=-1)
    assert np.ptp(speeds, axis=0).max() > 0.1, "no ball-ball collision happened in the test"
    assert np.all(np.abs(states[:, :6]) <= 1 - 0.25 + 1e-12)
    centres = states[:, :6].reshape(-1, 3, 2)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.linalg.norm(centres[:, i] - centres[:, j], axis=-1).min() >= 0.5 - 1e-9


# ---------------------------------------------------------------- n-link pendulum
def test_one_link_pendulum_equals_the_pendulum_env():
    kw = dict(friction=0.2, dt=0.05, substeps=4)
    single = make_env("nlink", image_size=16, n_links=1, link_length=1.0, max_torque=2.0, **kw)
    pend = make_env("pendulum", image_size=16, **kw)
    actions = np.random.default_rng(1).uniform(-2, 2, (50, 1)).astype(np.float32)
    _, s1 = rollout(single, actions, seed=0)
    pend.reset(seed=0, options={"state": s1[0]})
    s2 = np.stack([s1[0]] + [pend.step(a)[4]["state"] for a in actions])
    np.testing.assert_allclose(s1, s2, atol=1e-10)


def double_pendulum_accel(y, g=9.81, m1=1.0, m2=1.0, l1=0.5, l2=0.5):
    """Textbook explicit double-pendulum equations (independent of the env's matrix form)."""
    t1, t2, w1, w2 = y
    den = 2 * m1 + m2 - m2 * np.cos(2 * t1 - 2 * t2)
    a1 = (-g * (2 * m1 + m2) * np.sin(t1) - m2 * g * np.sin(t1 - 2 * t2)
          - 2 * np.sin(t1 - t2) * m2 * (w2**2 * l2 + w1**2 * l1 * np.cos(t1 - t2))) / (l1 * den)
    a2 = (2 * np.sin(t1 - t2) * (w1**2 * l1 * (m1 + m2) + g * (m1 + m2) * np.cos(t1)
          + w2**2 * l2 * m2 * np.cos(t1 - t2))) / (l2 * den)
    return np.array([w1, w2, a1, a2])


def test_double_pendulum_matches_textbook_equations():
    env = make_env("nlink", image_size=16, n_links=2, friction=0.0, substeps=10)
    _, states = rollout(env, np.zeros((20, 2), np.float32), seed=2)
    y, h = states[0].copy(), 0.05 / 200
    for k in range(20):
        for _ in range(200):
            k1 = double_pendulum_accel(y)
            k2 = double_pendulum_accel(y + h / 2 * k1)
            k3 = double_pendulum_accel(y + h / 2 * k2)
            k4 = double_pendulum_accel(y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        np.testing.assert_allclose(np.sin(states[k + 1, :2] - y[:2]), 0, atol=1e-6)
        np.testing.assert_allclose(states[k + 1, 2:], y[2:], atol=1e-5)


def test_three_link_frictionless_energy_conserved():
    env = make_env("nlink", image_size=16, n_links=3, friction=0.0)
    _, states = rollout(env, np.zeros((400, 3), np.float32), seed=0)
    energy = env.unwrapped.energy(states)
    scale = 9.81 * 3 * 0.5 * 3  # ~ m g (sum of lengths) (sum of masses)
    assert np.abs(energy - energy[0]).max() < 1e-3 * scale
    damped = make_env("nlink", image_size=16, n_links=3, friction=0.1)
    _, states = rollout(damped, np.zeros((100, 3), np.float32), seed=0)
    assert np.all(np.diff(damped.unwrapped.energy(states)) < 1e-6)


# ---------------------------------------------------------------- dot videos
def test_dot_paths_follow_their_curves_and_render_at_the_state():
    for name, on_curve in (
        ("dot_figure8", lambda x, y: y**2 - x**2 * (1 - x**2)),
        ("dot_square", lambda x, y: np.maximum(np.abs(x), np.abs(y)) - 1),
    ):
        env = make_env(name, image_size=10)
        frames, states = rollout(env, np.zeros((60, 0), np.float32), seed=0)
        np.testing.assert_allclose(on_curve(states[:, 0], states[:, 1]), 0, atol=1e-12)
        assert np.linalg.norm(np.diff(states, axis=0), axis=1).max() < 0.4  # smooth motion
        # intensity centroid (pixel units, y up) sits at the true position: world extent 1.25 over 10 px
        w = frames[..., 0].astype(float)
        px = (np.arange(10) + 0.5 - 5) * 0.25
        cx = (w * px[None, None, :]).sum((1, 2)) / w.sum((1, 2))
        cy = (w * -px[None, :, None]).sum((1, 2)) / w.sum((1, 2))
        inside = np.max(np.abs(states), axis=1) < 0.6  # away from the border the centroid is unbiased
        np.testing.assert_allclose(cx[inside], states[inside, 0], atol=0.05)
        np.testing.assert_allclose(cy[inside], states[inside, 1], atol=0.05)


def eq16(z, relax_rate=0.0):
    """The paper's Eq. 16 written out (k = 4, a = 0.5, theta0 = -3 pi / 8), plus the env's relaxation
    -relax_rate (r - 1) (cos theta, sin theta) towards the limit cycle."""
    x, y = z[..., 0], z[..., 1]
    r, th = np.sqrt(x**2 + y**2), np.arctan2(y, x)
    push = 0.5 * 4 * np.cos(4 * (th + 3 * np.pi / 8))
    dx = push * np.cos(th) - r * np.sin(th) - relax_rate * (r - 1) * np.cos(th)
    dy = push * np.sin(th) + r * np.cos(th) - relax_rate * (r - 1) * np.sin(th)
    return np.stack([dx, dy], -1)


def test_dot_swirl_vector_field_is_eq16():
    z = np.array([[1.0, 0.0], [0.3, -0.8], [-1.2, 0.5], [-0.4, -1.7], [2.0, 2.0]])
    env = make_env("dot_swirl", image_size=10).unwrapped
    np.testing.assert_allclose(env.field(z), eq16(z, relax_rate=1.0), rtol=0, atol=1e-12)
    literal = make_env("dot_swirl", image_size=10, relax_rate=0.0).unwrapped
    np.testing.assert_allclose(literal.field(z), eq16(z), rtol=0, atol=1e-12)
    # on the unit circle the relaxation vanishes; at theta = theta0 the radial push is a k = 2
    unit = np.array([[np.cos(-3 * np.pi / 8), np.sin(-3 * np.pi / 8)]])
    np.testing.assert_allclose(env.field(unit), 2 * unit + unit[:, ::-1] * [-1, 1], atol=1e-12)


def test_dot_swirl_step_is_rk4_of_the_field():
    rng = np.random.default_rng(0)
    angle, radius = rng.uniform(0, 2 * np.pi, 6), rng.uniform(0.9, 1.6, 6)
    z0 = np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)

    def fine(z, t, n=3000):  # explicit midpoint rule, n steps: error ~ 1e-8 here
        h = t / n
        for _ in range(n):
            z = z + h * eq16(z + 0.5 * h * eq16(z, 1.0), 1.0)
        return z

    errors = {}
    for dt in (0.3, 0.075):
        env = make_env("dot_swirl", image_size=10, process_noise=0.0, dt=dt)
        env.reset(seed=0)
        got = []
        for z in z0:
            env.unwrapped.position = z.copy()
            got.append(env.step(np.zeros(0, np.float32))[4]["state"])
        errors[dt] = np.abs(np.stack(got) - fine(z0, dt)).max()
    # k dt = 1.2 rad of petal phase per frame: one RK4 step is good to ~2e-2 (noise std per frame: 0.32)
    assert errors[0.3] < 0.05
    assert errors[0.075] < errors[0.3] / 200  # fourth order: local error ~ dt^5 (midpoint: ~ /64)


def test_dot_swirl_stays_bounded_in_frame_and_moves():
    env = make_env("dot_swirl", image_size=10)
    extent = env.unwrapped.canvas.extent
    inside, steps = 0, 0
    for seed in range(40):
        frames, states = rollout(env, np.zeros((300, 0), np.float32), seed=seed)
        assert np.isfinite(states).all()
        np.testing.assert_allclose(np.linalg.norm(states[0]), 1.0)  # unit-norm initial state
        r = np.linalg.norm(states, axis=1)
        assert r.max() < 2 * extent
        inside += (r < extent).sum()  # the swirl preserves radii: r < extent is in frame at any angle
        steps += len(r)
        assert (frames.max(axis=(1, 2, 3)) > 60).mean() > 0.99  # the dot is visible
        assert (np.abs(np.diff(frames.astype(int), axis=0)).max(axis=(1, 2, 3)) > 0).mean() > 0.95  # it moves
    assert inside / steps >= 0.99, inside / steps


def test_dot_swirl_distortion_is_skimage_swirl():
    # skimage.transform.swirl (rotation 0) maps output pixel (col, row), rows pointing down, about the
    # centre to the input pixel at angle atan2(row, col) + strength exp(-rho / (ln 2 radius / 5))
    from worldmodel.envs.dots import swirl
    col, row = np.array([0.5, -1.0, 2.0, 30.0]), np.array([1.5, 0.2, -3.0, 10.0])
    rho = np.hypot(col, row)
    angle = np.arctan2(row, col) + 10 * np.exp(-rho / (np.log(2) * 200 / 5))
    x, y = swirl(col, -row, 10.0, 200.0)  # the same pixels in y-up coordinates
    np.testing.assert_allclose(np.stack([x, -y]), np.stack([rho * np.cos(angle), rho * np.sin(angle)]), atol=1e-12)
    env = make_env("dot_swirl", image_size=10)
    plain = make_env("dot_swirl", image_size=10, swirl_strength=0.0)
    assert not np.array_equal(plain.reset(seed=1)[0], env.reset(seed=1)[0])  # the distortion changes the frame


# ---------------------------------------------------------------- training defaults and readout targets
@pytest.mark.parametrize("name", [*ENV_IDS, *GYM_PIXEL_ENVS])
def test_env_defaults_build_data_a_model_accepts_and_readout_targets(name):
    if name in GYM_PIXEL_ENVS:
        pytest.importorskip("pygame", reason="gymnasium's classic-control rendering needs pygame")
    d = env_defaults(name)
    assert d.channels == 3 and d.episode_length >= 1
    encoder = ConvEncoder(d.image_size, d.channels, out_dim=4, depth=2, pool=2)  # pool: the model's default
    env = make_env(name, image_size=d.image_size, **d.env_kwargs)
    env.action_space.seed(0)
    obs, info = env.reset(seed=0)
    states = [info["state"]]
    for _ in range(5):
        action = env.action_space.sample()
        assert action_vector(env.action_space, action).shape == (d.action_dim,)
        obs, _, _, _, info = env.step(action)
        states.append(info["state"])
    assert obs.shape == (d.image_size, d.image_size, d.channels) and obs.dtype == np.uint8
    assert encoder(torch.as_tensor(obs)[None]).shape == (1, 4)
    states = np.stack(states)[None]  # (B, T, state_dim)
    targets, names = readout_targets(env, states)
    assert targets.dtype == torch.float64 and targets.shape == (1, 6, len(names)) and torch.isfinite(targets).all()
    assert len(set(names)) == len(names) and all(isinstance(n, str) and n for n in names)
    # float32 torch states (as the rollout store holds them) give the same targets
    torch.testing.assert_close(readout_targets(env, torch.as_tensor(states, dtype=torch.float32))[0], targets,
                               rtol=0, atol=1e-6)


def test_env_defaults_of_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown env name 'nope'; choose one of .*'pendulum'.*'cartpole'"):
        env_defaults("nope")


def test_pendulum_readout_targets_closed_form_in_order():
    env = make_env("pendulum", image_size=16)
    theta, theta_dot = np.array([0.3, -2.5, 3.0]), np.array([-2.0, 0.7, 5.0])  # all components distinct
    targets, names = readout_targets(env, np.stack([theta, theta_dot], -1))
    assert names == ["sin θ", "cos θ", "θ̇"]
    np.testing.assert_array_equal(targets.numpy(), np.stack([np.sin(theta), np.cos(theta), theta_dot], -1))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        readout_targets(env, theta[:, None])


def test_angle_readout_targets_of_nlink_and_gym_envs():
    state = np.array([0.3, -2.5, -2.0, 0.7])  # (theta_1, theta_2, theta_dot_1, theta_dot_2)
    expected = [np.sin(0.3), np.cos(0.3), np.sin(-2.5), np.cos(-2.5), -2.0, 0.7]
    for env in (make_env("nlink", image_size=16), make_env("acrobot", image_size=16)):
        targets, names = readout_targets(env, state)
        assert names == ["sin θ1", "cos θ1", "sin θ2", "cos θ2", "θ̇1", "θ̇2"]
        np.testing.assert_array_equal(targets.numpy(), expected)
    single, pendulum = make_env("nlink", image_size=16, n_links=1), make_env("pendulum", image_size=16)
    for env in (single, make_env("gym_pendulum", image_size=16)):
        got, want = readout_targets(env, state[:2]), readout_targets(pendulum, state[:2])
        assert got[1] == want[1]
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    targets, names = readout_targets(make_env("cartpole", image_size=16), state)  # no angle-aware targets
    assert names == ["state[0]", "state[1]", "state[2]", "state[3]"]
    np.testing.assert_array_equal(targets.numpy(), state)


def test_balls_and_dot_readout_targets():
    env = make_env("balls", image_size=16, n_balls=2)
    state = np.arange(8.0)
    targets, names = readout_targets(env, state)
    assert names == ["x1", "y1", "x2", "y2", "vx1", "vy1", "vx2", "vy2"]
    np.testing.assert_array_equal(targets.numpy(), state)
    for name in ("dot_figure8", "dot_swirl"):
        assert readout_targets(make_env(name, image_size=10), state[:2])[1] == ["x", "y"]
    env = make_env("dot_square", image_size=10)  # the sinusoid at the motion frequency: the lap phase
    env.reset(seed=0)
    states, phases = [], []
    for _ in range(60):
        states.append(env.step(np.zeros(0, np.float32))[4]["state"])
        phases.append(env.unwrapped.phase)
    targets, names = readout_targets(env, np.stack(states))
    assert names == ["x", "y", "sin φ", "cos φ"]
    np.testing.assert_allclose(targets[:, :2].numpy(), np.stack(states), rtol=0, atol=0)
    np.testing.assert_allclose(targets[:, 2:].numpy(), np.stack([np.sin(phases), np.cos(phases)], -1), atol=1e-12)


# ---------------------------------------------------------------- observation noise and pixel wrapper
def test_observation_noise_semantics():
    clean_env = make_env("pendulum", image_size=32)
    clean, states = rollout(clean_env, np.zeros((300, 1), np.float32), seed=0)
    env = make_env("pendulum", image_size=32, pixel_noise=0.1)
    noisy, noisy_states = rollout(env, np.zeros((300, 1), np.float32), seed=0)
    np.testing.assert_array_equal(states, noisy_states)  # state untouched
    # on black pixels the output is round(max(0, 25.5 N(0, 1))): mean 25.5 / sqrt(2 pi), half are zero
    background = noisy[clean == 0].astype(float)
    assert background.size > 100_000
    assert abs(background.mean() - 25.5 / np.sqrt(2 * np.pi)) < 0.2
    assert abs(np.mean(background == 0) - 0.5) < 0.02

    env = make_env("pendulum", image_size=32, drop_prob=0.3)
    obs, info = env.reset(seed=1)
    assert info["dropped"] is False
    drops = []
    for _ in range(400):
        obs, _, _, _, info = env.step(np.zeros(1, np.float32))
        drops.append(info["dropped"])
        assert (obs.max() == 0) == info["dropped"]
    assert abs(np.mean(drops) - 0.3) < 0.07

    env = make_env("pendulum", image_size=32, correlated_noise=0.2)
    frames, factors = [], []
    obs, info = env.reset(seed=2)
    clean_env.reset(seed=2)
    for t in range(200):
        clean_frame = clean_env.render()
        f = info["noise_factor"]
        factors.append(f)
        if f == 1.0:
            np.testing.assert_array_equal(obs, clean_frame)
        if f == 0.0:
            assert abs(obs.astype(float).mean() - 127.5) < 6  # pure uniform noise
        obs, _, _, _, info = env.step(np.zeros(1, np.float32))
        clean_env.step(np.zeros(1, np.float32))
    factors = np.array(factors)
    assert factors.min() >= 0 and factors.max() <= 1 and len(np.unique(factors)) > 10
    assert np.abs(np.diff(factors)).max() <= 0.2 / 0.2 + 1e-9  # steps of U(-0.2, 0.2) / (t2 - t1 >= 0.2)
    with pytest.raises(ValueError, match="drop_prob"):
        make_env("pendulum", drop_prob=1.5)


class StubRenderEnv:
    """A tiny gymnasium env whose render() is a known 40x60 frame and whose state is a counter."""

    @staticmethod
    def make(render_mode="rgb_array"):
        import gymnasium

        class Stub(gymnasium.Env):
            observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float64)
            action_space = gymnasium.spaces.Discrete(2)

            def __init__(self):
                self.render_mode = render_mode
                self.state = np.zeros(3)

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                self.state = np.array([0.0, 1.0, 2.0])
                return self.state[:2].copy(), {}

            def step(self, action):
                self.state = self.state + 1
                return self.state[:2].copy(), 1.0, False, False, {}

            def render(self):
                frame = np.zeros((40, 60, 3), np.uint8)
                frame[: int(self.state[0]) % 40] = 200
                return frame

        return Stub()


def test_pixel_observation_wraps_rgb_array_envs():
    from worldmodel.envs import PixelObservation, resize_frame

    env = PixelObservation(StubRenderEnv.make(), image_size=(8, 12))
    obs, info = env.reset(seed=0)
    assert obs.shape == (8, 12, 3) and obs.dtype == np.uint8 and obs.max() == 0
    np.testing.assert_array_equal(info["state"], [0, 1, 2])
    for _ in range(7):
        obs, _, _, _, info = env.step(0)
    np.testing.assert_array_equal(info["state"], [7, 8, 9])
    # 7 bright rows of 40, box-averaged onto 8 rows of 5: row 0 full, row 1 two fifths
    np.testing.assert_array_equal(obs[:, 0, 0], np.round([200, 80, 0, 0, 0, 0, 0, 0]))
    frame = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    block = frame.reshape(8, 5, 12, 5, 3).astype(float).mean((1, 3))
    assert np.abs(resize_frame(frame, (8, 12)).astype(float) - block).max() <= 0.5
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        PixelObservation(StubRenderEnv.make(render_mode=None))


@pytest.mark.parametrize("name, state_dim", [("cartpole", 4), ("gym_pendulum", 2), ("acrobot", 4)])
def test_classic_control_pixels(name, state_dim):
    pytest.importorskip("pygame", reason="gymnasium's classic-control rendering needs pygame")
    env = make_env(name, image_size=32)
    obs, info = env.reset(seed=0)
    assert obs.shape == (32, 32, 3) and obs.dtype == np.uint8 and info["state"].shape == (state_dim,)
    obs2, _, _, _, info2 = env.step(env.action_space.sample())
    assert not np.array_equal(info["state"], info2["state"])


@pytest.mark.parametrize("name", ALL)
def test_gymnasium_env_checker_passes(name):
    import warnings

    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the advice to normalise Box action ranges
        check_env(make_env(name, image_size=16).unwrapped)


@pytest.mark.parametrize("size", [(64, 64), (17, 23), (8, 8)])
def test_windowed_drawing_equals_full_frame_drawing(size):
    """Shapes are rasterised only near their bounding box; an identity warp forces full-frame drawing."""
    from worldmodel.envs.render import Canvas

    fast, full = Canvas(size, 1.2), Canvas(size, 1.2, warp=lambda x, y: (x, y))
    rng = np.random.default_rng(0)
    for _ in range(100):
        p, q, r = rng.uniform(-1.6, 1.6, 2), rng.uniform(-1.6, 1.6, 2), rng.uniform(0, 0.3)
        images = []
        for canvas in (fast, full):
            image = canvas.blank()
            canvas.capsule(image, p, q, r, (1.0, 1.0, 1.0))
            canvas.disc(image, q, 2 * r, (1.0, 0.5, 0.2))
            images.append(canvas.to_uint8(image))
        np.testing.assert_array_equal(images[0], images[1])


# ---------------------------------------------------------------- DeepMind Control (optional: dm_control)
@pytest.fixture(scope="module")
def dmc_cartpole():
    """One small dmc:cartpole-swingup env shared by the DeepMind Control tests (skipped without dm_control)."""
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")  # as worldmodel.envs.dmc does, before dm_control is imported
    pytest.importorskip("dm_control")
    env = make_env("dmc:cartpole-swingup", image_size=24)
    yield env
    env.close()


def test_dmc_frames_state_reward_and_seeding(dmc_cartpole):
    env, u = dmc_cartpole, dmc_cartpole.unwrapped
    physics = u.physics
    assert env.action_space == gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
    obs, info = env.reset(seed=0)
    assert obs.shape == (24, 24, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs, physics.render(24, 24, camera_id=0))  # camera 0, rendered at the size
    frames, states = [obs], [info["state"]]
    for a in (1.0, -1.0, 1.0):
        obs, reward, terminated, truncated, info = env.step(np.array([a], np.float32))
        assert not (terminated or truncated) and 0.0 <= reward <= u.action_repeat  # task reward in [0, 1] per control step
        # info["state"] = (qpos, qvel) of the physics: cart position, pole angle, their velocities
        np.testing.assert_array_equal(info["state"], np.concatenate([physics.data.qpos, physics.data.qvel]))
        np.testing.assert_array_equal(info["state"], physics.get_state())
        frames.append(obs)
        states.append(info["state"])
    assert u.state_names == ["slider", "hinge_1", "v slider", "v hinge_1"]
    assert all(not np.array_equal(f, g) for f, g in zip(frames, frames[1:]))  # the frames move
    again, info_again = env.reset(seed=0)  # a seed fixes the initial state; another seed changes it
    np.testing.assert_array_equal(again, frames[0])
    np.testing.assert_array_equal(info_again["state"], states[0])
    assert not np.array_equal(env.reset(seed=1)[1]["state"], states[0])


def test_dmc_action_repeat_steps_the_physics_that_many_times(dmc_cartpole):
    env, u = dmc_cartpole, dmc_cartpole.unwrapped
    assert u.action_repeat == 8  # PlaNet's cartpole setting
    env.reset(seed=2)
    t0 = u.physics.data.time
    _, reward, _, _, info = env.step(np.array([0.5], np.float32))
    assert u.physics.data.time - t0 == pytest.approx(8 * u._env.control_timestep())
    single = make_env("dmc:cartpole-swingup", image_size=8, action_repeat=1)
    try:
        assert single.unwrapped.episode_length == 1000
        single.reset(seed=2)
        rewards = [single.step(np.array([0.5], np.float32))[1] for _ in range(8)]
        np.testing.assert_array_equal(single.unwrapped.true_state(), info["state"])
        assert sum(rewards) == pytest.approx(reward)
    finally:
        single.close()
    with pytest.raises(ValueError, match="action_repeat"):
        make_env("dmc:cartpole-swingup", image_size=8, action_repeat=0)


def test_dmc_env_defaults_match_the_env_and_its_time_limit(dmc_cartpole):
    from worldmodel.envs import EnvDefaults

    env, u = dmc_cartpole, dmc_cartpole.unwrapped
    assert env_defaults("dmc:cartpole-swingup") == EnvDefaults(image_size=64, channels=3, action_dim=1,
                                                               episode_length=125, env_kwargs={})
    assert u.episode_length == 1000 // 8 and env.make_env_args == ("dmc:cartpole-swingup", {"image_size": 24})
    # episodes end at the task's 1000 control steps: ceil(1000 / action_repeat) steps, the last one shorter
    coarse = make_env("dmc:cartpole-swingup", image_size=8, action_repeat=300)
    try:
        assert coarse.unwrapped.episode_length == 4 and env_defaults("dmc:cartpole-swingup").episode_length == 125
        coarse.reset(seed=3)
        ends = [coarse.step(np.zeros(1, np.float32))[2:4] for _ in range(4)]
        assert ends == [(False, False)] * 3 + [(False, True)]  # truncated at the 20 s limit, never terminated
        assert coarse.unwrapped.physics.data.time == pytest.approx(1000 * coarse.unwrapped._env.control_timestep())
    finally:
        coarse.close()


def test_dmc_readout_targets(dmc_cartpole):
    env = dmc_cartpole
    x, theta, v, omega = 0.3, 2.0, -1.0, 4.0
    targets, names = readout_targets(env, np.array([[x, theta, v, omega]]))
    assert names == ["slider", "sin hinge_1", "cos hinge_1", "v slider", "v hinge_1"]
    torch.testing.assert_close(targets, torch.tensor([[x, np.sin(theta), np.cos(theta), v, omega]], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        readout_targets(env, np.zeros((3, 5)))
    # other domains, from their initial physics state (built without rendering)
    expect = {
        "dmc:reacher-easy": (["sin shoulder", "cos shoulder", "sin wrist", "cos wrist", "v shoulder", "v wrist",
                              "target x", "target y"], 6),
        "dmc:walker-walk": (None, 18),
    }
    for name, (expected, state_dim) in expect.items():
        other = make_env(name, image_size=8)
        try:
            u = other.unwrapped
            state = u.true_state()
            assert state.shape == (state_dim,) and len(u.state_names) == state_dim
            targets, names = readout_targets(other, np.stack([state, state]))
            assert targets.shape == (2, len(names)) and torch.isfinite(targets).all() and len(set(names)) == len(names)
            if expected is not None:
                assert names == expected
            else:  # the tracking camera does not see the root's x: left out, its velocity kept; 6 hinges + rooty as sin/cos
                assert "rootx" not in names and "v rootx" in names and "rootz" in names and len(names) == 8 * 2 + 1 + 9 - 2
            if name == "dmc:reacher-easy":
                np.testing.assert_array_equal(state[-2:], u.physics.named.model.geom_pos["target", ["x", "y"]])
        finally:
            other.close()


def test_dmc_unknown_tasks_are_a_value_error_listing_the_valid_ones(dmc_cartpole):
    for name in ("dmc:cartpole-nope", "dmc:nope-run", "dmc:cartpole"):
        with pytest.raises(ValueError, match=f"unknown DeepMind Control task '{name}'; choose one of .*'dmc:cartpole-swingup'.*'dmc:walker-walk'"):
            make_env(name)
    with pytest.raises(ValueError, match="unknown DeepMind Control task"):
        env_defaults("dmc:nope-run")


def test_dmc_without_dm_control_names_the_install(monkeypatch):
    from worldmodel.envs import dmc

    monkeypatch.setitem(sys.modules, "dm_control", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "dm_control.suite", None)
    with pytest.raises(ImportError, match="pip install dm_control.*MUJOCO_GL=egl"):
        make_env("dmc:cartpole-swingup")
    with pytest.raises(ImportError, match="pip install dm_control"):
        dmc.suite()


def test_cartpole_data_policy_keeps_the_pole_up_where_random_pushes_drop_it():
    """cartpole's data policy is a noisy balancer on the true state: its episodes hold a training window of 32
    steps, where Ornstein-Uhlenbeck pushes end them after about 11; other envs keep OU actions."""
    from gymnasium import spaces

    from worldmodel.datasets import OUPolicy, StateFeedbackPolicy, ou_policy
    from worldmodel.envs import data_policy

    env = gymnasium.make("CartPole-v1")  # the physics of the cartpole env, without rendering

    def median_length(policy, episodes=30):
        lengths = []
        for i in range(episodes):
            policy.reset(np.random.default_rng(i))
            obs, _ = env.reset(seed=i)
            for t in range(100):
                obs, _, terminated, truncated, _ = env.step(policy(None, {"state": obs}))
                if terminated or truncated:
                    break
            lengths.append(t + 1)
        return float(np.median(lengths))

    policy = data_policy("cartpole", env)
    assert isinstance(policy, StateFeedbackPolicy)
    assert median_length(policy) >= 90 and median_length(ou_policy(env)) <= 20
    assert isinstance(data_policy("pendulum", make_env("pendulum", image_size=16)), OUPolicy)
    # the feedback rule itself: push towards the side the pole leans to (epsilon 0, no noise)
    rule = StateFeedbackPolicy(env.action_space, gains=(0, 0, 1, 0), epsilon=0.0, noise_std=0.0)
    assert rule(None, {"state": [0, 0, 0.1, 0]}) == 1 and rule(None, {"state": [0, 0, -0.1, 0]}) == 0
    box = StateFeedbackPolicy(spaces.Box(-2.0, 2.0, (1,)), gains=(3.0,), epsilon=0.0, noise_std=0.0)
    assert box(None, {"state": [0.5]}) == pytest.approx([1.5]) and box(None, {"state": [1.0]}) == pytest.approx([2.0])
    with pytest.raises(ValueError, match="Discrete\\(2\\) or Box"):
        StateFeedbackPolicy(spaces.Discrete(3), gains=(1,))
