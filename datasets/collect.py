"""Rollout collection into a ``RolloutStore``, resumable, plus random and Ornstein-Uhlenbeck policies.

A policy is a callable ``policy(obs, info) -> action``; if it has ``reset(rng)``, ``collect`` calls
it at the start of every episode with a generator derived from (seed, episode index), so a resumed
collection equals an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gymnasium
import numpy as np
from gymnasium import spaces
from tqdm.auto import tqdm

from .store import RolloutStore, store_exists


def action_dim(space: spaces.Space) -> int:
    """Width of the stored action vector: flattened Box, or one-hot for Discrete."""
    if isinstance(space, spaces.Box):
        return int(np.prod(space.shape))
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    raise ValueError(f"unsupported action space {space!r}; use Box or Discrete")


def action_vector(space: spaces.Space, action) -> np.ndarray:
    """The stored float32 form of ``action``: flattened Box action, or one-hot Discrete index."""
    if isinstance(space, spaces.Discrete):
        vector = np.zeros(space.n, np.float32)
        vector[int(action) - int(space.start)] = 1.0
        return vector
    return np.asarray(action, np.float32).reshape(-1)


class RandomPolicy:
    """Independent uniform actions from the action space (Box or Discrete)."""

    def __init__(self, action_space: spaces.Space):
        action_dim(action_space)  # validates the space
        self.space = action_space
        self.rng = np.random.default_rng()

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, obs=None, info=None):
        if isinstance(self.space, spaces.Discrete):
            return int(self.space.start + self.rng.integers(self.space.n))
        return self.rng.uniform(self.space.low, self.space.high).astype(self.space.dtype)


class OUPolicy:
    """Smooth Ornstein-Uhlenbeck actions.

    In units of the action range, x_{t+1} = (1 - theta) x_t + sigma eps_t, eps_t ~ N(0, I), with x_0
    drawn from the stationary law N(0, sigma^2 / (1 - (1 - theta)^2)). Box: action = clip(centre +
    half_range * x); Discrete(n): action = bin of clip(x, -1, 1) among n equal bins (so actions persist).
    theta in (0, 1] sets the mean-reversion per step (1 = white noise).
    """

    def __init__(self, action_space: spaces.Space, theta: float = 0.15, sigma: float = 0.3):
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta must be in (0, 1], got {theta}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if isinstance(action_space, spaces.Box) and not np.all(np.isfinite([action_space.low, action_space.high])):
            raise ValueError("OUPolicy needs a bounded Box action space")
        self.space, self.theta, self.sigma = action_space, float(theta), float(sigma)
        self.shape = (1,) if isinstance(action_space, spaces.Discrete) else action_space.shape
        action_dim(action_space)
        self.reset(np.random.default_rng())

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng
        stationary_std = self.sigma / np.sqrt(1.0 - (1.0 - self.theta) ** 2)
        self.x = stationary_std * rng.standard_normal(self.shape)

    def __call__(self, obs=None, info=None):
        x = self.x
        self.x = (1.0 - self.theta) * x + self.sigma * self.rng.standard_normal(self.shape)
        if isinstance(self.space, spaces.Discrete):
            index = min(int((np.clip(x[0], -1, 1) + 1) / 2 * self.space.n), self.space.n - 1)
            return int(self.space.start + index)
        centre, half = (self.space.high + self.space.low) / 2, (self.space.high - self.space.low) / 2
        return np.clip(centre + half * x, self.space.low, self.space.high).astype(self.space.dtype)


class StateFeedbackPolicy:
    """Noisy linear feedback on the true state, for data that stays where random actions would end the episode
    (cart-pole balancing). s = gains . info["state"] + noise_std N(0, 1); Discrete(2): action 1 when s > 0;
    Box: clip(s) to its range; with probability ``epsilon`` a uniform random action instead."""

    def __init__(self, action_space: spaces.Space, gains, epsilon: float = 0.3, noise_std: float = 0.05):
        if isinstance(action_space, spaces.Discrete) and action_space.n != 2:
            raise ValueError(f"StateFeedbackPolicy takes Discrete(2) or Box actions, got {action_space!r}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.gains, self.epsilon, self.noise_std = np.asarray(gains, np.float64), float(epsilon), float(noise_std)
        self.random = RandomPolicy(action_space)
        self.space = action_space
        self.reset(np.random.default_rng())

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.random.reset(rng)

    def __call__(self, obs=None, info=None):
        if self.rng.random() < self.epsilon:
            return self.random()
        s = float(self.gains @ np.asarray(info["state"], np.float64)) + self.noise_std * self.rng.standard_normal()
        if isinstance(self.space, spaces.Discrete):
            return int(self.space.start + (s > 0))
        return np.clip(np.full(self.space.shape, s), self.space.low, self.space.high).astype(self.space.dtype)


def random_policy(env: gymnasium.Env) -> RandomPolicy:
    """Uniform random actions for ``env``."""
    return RandomPolicy(env.action_space)


def ou_policy(env: gymnasium.Env, theta: float = 0.15, sigma: float = 0.3) -> OUPolicy:
    """Smooth Ornstein-Uhlenbeck actions for ``env`` (see ``OUPolicy``)."""
    return OUPolicy(env.action_space, theta=theta, sigma=sigma)


def episode_seeds(seed: int, episode: int) -> tuple[int, int]:
    """(env seed, policy seed) of one episode, derived from the collection seed and episode index."""
    env_seed, policy_seed = np.random.SeedSequence([int(seed), int(episode)]).generate_state(2)
    return int(env_seed), int(policy_seed)


def _open_or_create(store, env: gymnasium.Env, seed: int, storage_options: dict | None = None) -> RolloutStore:
    if isinstance(store, RolloutStore):
        return store
    if store_exists(store, storage_options):
        return RolloutStore.open(store, storage_options=storage_options)
    json_safe = lambda kwargs: {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, type(None), list, tuple))}
    spec = env.spec
    obs_space = env.observation_space
    state = env.reset(seed=seed)[1].get("state")
    store = RolloutStore.create(
        store,
        obs_shape=obs_space.shape,
        action_dim=action_dim(env.action_space),
        state_dim=0 if state is None else int(np.size(state)),
        env_id=spec.id if spec else type(env.unwrapped).__name__,
        env_kwargs=json_safe(spec.kwargs) if spec else {},
        seed=seed,
        storage_options=storage_options,
    )
    if hasattr(env, "make_env_args"):  # built by worldmodel.envs.make_env: make_env(name, **kwargs) rebuilds it
        name, kwargs = env.make_env_args
        store.update_attrs(make_env={"name": name, "kwargs": json_safe(kwargs)})
    return store


class _OneEnv:
    """An unbatched policy ``policy(obs, info)`` (with optional ``reset(rng)``) as a batched one of one env."""

    def __init__(self, policy):
        self.policy = policy

    def reset(self, rngs: list[np.random.Generator]) -> None:
        if hasattr(self.policy, "reset"):
            self.policy.reset(rngs[0])

    def __call__(self, obs: np.ndarray, infos: list[dict]) -> list:
        return [self.policy(obs[0], infos[0])]


def collect(
    env: gymnasium.Env | Sequence[gymnasium.Env],
    policy,
    n_episodes: int,
    T: int,
    store: RolloutStore | str | os.PathLike,
    seed: int = 0,
    progress: bool = True,
    storage_options: dict | None = None,
) -> RolloutStore:
    """Roll ``policy`` in ``env`` until ``store`` holds ``n_episodes`` episodes of (up to) T steps.

    Resumable: episodes already committed are kept and only the missing ones are collected. Episode i
    resets the env with ``episode_seeds(seed, i)[0]`` and the policy (if it has ``reset``) with a
    generator from ``episode_seeds(seed, i)[1]``. Step t stores obs[t], info["state"] at t, the
    action taken after seeing obs[t], the reward it earned, and mask[t] = not info.get("dropped").
    An episode that terminates or truncates early is stored with its shorter length.

    ``env`` may be a list of E envs of one kind: episodes then run E at a time in lockstep with a *batched*
    policy, ``policy.reset(rngs)`` (if it has ``reset``; one generator per episode, as above) and
    ``policy(obs (E, *obs_shape), infos: list of E dicts) -> E actions`` (an env whose episode has ended is
    not stepped again; its action is ignored). A batch is committed, in episode order, when all of its
    episodes have ended, so an interrupted batch is collected again on resumption; with the same E, a
    resumed collection equals an uninterrupted one.

    ``store`` may be a path or an fsspec URL (with ``storage_options``, see ``RolloutStore.create``): an existing store is opened, a missing one created from the env (attrs:
    env_id = the gymnasium id, env_kwargs = its kwargs, and ``make_env`` = {"name", "kwargs"} when the
    env came from ``worldmodel.envs.make_env``, including observation-noise options).
    """
    if int(n_episodes) != n_episodes or n_episodes < 0:
        raise ValueError(f"n_episodes must be a non-negative int, got {n_episodes!r}")
    if int(T) != T or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    envs = list(env) if isinstance(env, (list, tuple)) else [env]
    if not envs:
        raise ValueError("collect needs an env or a non-empty list of envs")
    if not isinstance(env, (list, tuple)):
        policy = _OneEnv(policy)
    store = _open_or_create(store, envs[0], seed, storage_options)
    if store.meta.get("seed") not in (None, seed):
        raise ValueError(f"seed={seed} differs from the seed {store.meta['seed']} this store was collected with")
    if store.episode_length not in (None, T):
        raise ValueError(f"T={T} differs from the store's episode_length {store.episode_length}")
    if store.episode_length is None:
        store.set_episode_length(T)
    if store.meta.get("seed") is None:
        store.update_attrs(seed=seed)
    for e in envs:
        if tuple(e.observation_space.shape) != store.obs_shape:
            raise ValueError(f"env observation shape {e.observation_space.shape} differs from the store's {store.obs_shape}")
        if (width := action_dim(e.action_space)) != store.action_dim:
            raise ValueError(f"env action width {width} differs from the store's action_dim {store.action_dim}")
    start = len(store)
    bar = tqdm(total=n_episodes, initial=start, disable=not progress, desc="collect", unit="ep")
    for first in range(start, n_episodes, len(envs)):
        seeds = [episode_seeds(seed, i) for i in range(first, min(first + len(envs), n_episodes))]
        episodes = _episode_batch(envs, policy, seeds, T, store)
        for episode in episodes:
            store.append(**episode)
        bar.update(len(episodes))
    bar.close()
    return store


def _episode_batch(envs, policy, seeds: list[tuple[int, int]], T: int, store: RolloutStore) -> list[dict]:
    """Run one episode per (env seed, policy seed) in ``envs`` in lockstep; the episodes as ``store.append`` kwargs."""
    n = len(seeds)
    if hasattr(policy, "reset"):
        policy.reset([np.random.default_rng(policy_seed) for _, policy_seed in seeds])
    first = [e.reset(seed=env_seed) for e, (env_seed, _) in zip(envs, seeds)]
    obs, infos = [o for o, _ in first], [i for _, i in first]
    frames = np.empty((n, T, *store.obs_shape), np.uint8)
    actions = np.empty((n, T, store.action_dim), np.float32)
    states = np.empty((n, T, store.state_dim), np.float32)
    rewards = np.empty((n, T), np.float32)
    mask = np.empty((n, T), bool)
    steps = np.full(n, T)
    for t in range(T):
        chosen = policy(np.stack(obs), infos)
        for i in np.flatnonzero(steps > t):
            frames[i, t] = obs[i]
            if store.state_dim:
                states[i, t] = infos[i]["state"]
            mask[i, t] = not infos[i].get("dropped", False)
            actions[i, t] = action_vector(envs[i].action_space, chosen[i])
            obs[i], rewards[i, t], terminated, truncated, infos[i] = envs[i].step(chosen[i])
            if terminated or truncated:
                steps[i] = t + 1
        if not (steps > t + 1).any():
            break
    return [dict(obs=frames[i, :k], action=actions[i, :k], state=states[i, :k], reward=rewards[i, :k], mask=mask[i, :k])
            for i, k in enumerate(steps)]
