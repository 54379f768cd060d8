"""The run's data: the rollout store (built if missing), its train / val split, and the windows of step s.

Exact resume rests on ``WindowSampler``: the windows of step s come from a generator seeded by
(seed, s), so any step's batch can be drawn again without replaying the ones before it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from worldmodel.training import ddp
from worldmodel.training.config import TrainConfig

__all__ = ["WindowSampler", "ensure_dataset", "imported_store_settings", "is_imported", "load_split", "make_run_env", "open_store", "split_episodes",
           "split_windows", "train_batches", "validation_batch", "window_batch"]


def _env_spec(cfg: TrainConfig) -> tuple[str, dict]:
    """(name, kwargs) of the run's ``make_env`` call."""
    return cfg.env, {"image_size": cfg.model.image_size, **cfg.env_kwargs}


def make_run_env(cfg: TrainConfig):
    """The run's environment: ``worldmodel.envs.make_env(cfg.env, image_size=..., **cfg.env_kwargs)``."""
    from worldmodel.envs import make_env

    name, kwargs = _env_spec(cfg)
    return make_env(name, **kwargs)


def open_store(cfg: TrainConfig):
    """The existing store ``cfg.data``, read-only (ranks other than 0, once rank 0 has built it)."""
    from worldmodel.datasets import RolloutStore

    return RolloutStore.open(cfg.data, read_only=True)


def ensure_dataset(cfg: TrainConfig):
    """Open ``cfg.data``, building it (or topping it up) with ``collect`` and the env's data policy if it holds
    fewer than train_episodes + val_episodes episodes. Raises ValueError on an incompatible store.
    ``cfg.data``: a local path or an fsspec URL (``s3://bucket/pendulum.zarr``; credentials and options from
    the filesystem's usual sources, e.g. ``FSSPEC_S3_ENDPOINT_URL`` or ``AWS_*`` variables)."""
    from worldmodel.datasets import RolloutStore, collect, urls
    from worldmodel.envs import data_policy

    needed = cfg.train_episodes + cfg.val_episodes
    path = urls.location(cfg.data)  # a Path, or the URL of a store on object storage
    store = None
    if urls.exists(path):
        try:
            store = RolloutStore.open(path)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"cannot use the dataset at {str(path)!r}: {err}") from None
        _check_store(store, cfg)
        if len(store) >= needed:
            return store
    env = make_run_env(cfg)
    if store is not None and (store.meta.get("env_id") != env.spec.id or store.meta.get("seed") != cfg.seed):
        env.close()
        what = "is empty (0 episodes)" if len(store) == 0 else f"has {len(store)} episodes"
        raise ValueError(f"the dataset {str(path)!r} {what} but {needed} are needed (train_episodes="
                         f"{cfg.train_episodes} + val_episodes={cfg.val_episodes}), and it was not built by train.py "
                         f"for env={cfg.env!r}, seed={cfg.seed}, so it is not extended; pass another --data path")
    policy = data_policy(cfg.env, env)
    ddp.log(f"building dataset {str(path)!r}: {needed - (len(store) if store else 0)} episodes of "
            f"{cfg.episode_length} steps ({cfg.env}, {type(policy).__name__} actions)")
    try:
        store = collect(env, policy, needed, cfg.episode_length, store or path, seed=cfg.seed,
                        progress=cfg.progress)
    except ValueError as err:
        raise ValueError(f"cannot extend the dataset at {str(path)!r}: {err}; pass a new --data path") from None
    finally:
        env.close()
    _check_store(store, cfg)
    return store


def _check_store(store, cfg: TrainConfig) -> None:
    """ValueError unless the store's frames and actions fit the model config."""
    (height, width, channels), model = store.obs_shape, cfg.model
    where = f"the dataset {str(store.path)!r}"
    if (height, width) != (model.image_size, model.image_size):
        raise ValueError(f"{where} holds {height}x{width} images but the model expects image_size="
                         f"{model.image_size}; pass --data with another path (it is built) or --model.image-size "
                         f"{height}")
    if channels != model.channels:
        raise ValueError(f"{where} holds {channels}-channel images; pass --model.channels {channels}")
    if store.action_dim != model.action_dim:
        raise ValueError(f"{where} holds {store.action_dim}-dimensional actions; pass --model.action-dim "
                         f"{store.action_dim}")
    built = store.meta.get("make_env")  # recorded by collect for envs from worldmodel.envs.make_env
    name, kwargs = _env_spec(cfg)
    wanted = {"name": name, "kwargs": kwargs}
    if built is not None and built != json.loads(json.dumps(wanted)):
        raise ValueError(f"{where} was built with make_env({built['name']!r}, **{built['kwargs']}) but this run "
                         f"asks for make_env({cfg.env!r}, **{wanted['kwargs']}); pass another --data path")


def split_episodes(store, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Store indices (ascending) of the train episodes (the first train_episodes) and of the val episodes
    (the next val_episodes). With ``cfg.skip_corrupt`` the corrupt ones (``RolloutStore.verify``) are passed
    over with a warning naming them and the next intact ones take their place; without it a corrupt episode
    raises CorruptEpisodeError when it is read. ValueError if too few episodes are left."""
    needed, where = cfg.train_episodes + cfg.val_episodes, f"the dataset {str(store.path)!r}"
    counts = f"train_episodes={cfg.train_episodes} + val_episodes={cfg.val_episodes}"
    if len(store) == 0:
        raise ValueError(f"{where} is empty (0 episodes)")
    if len(store) < needed:
        raise ValueError(f"{where} has {len(store)} episodes, {needed} needed ({counts})")
    chosen = np.arange(needed)
    if cfg.skip_corrupt:
        intact, corrupt = [], []
        for i in range(len(store)):
            if len(intact) == needed:
                break
            (corrupt if store.verify([i]) else intact).append(i)
        if corrupt:
            ddp.log(f"warning: skipping the corrupt episodes {corrupt} of {where} (--skip-corrupt); the next "
                    f"intact episodes take their place")
        if len(intact) < needed:
            raise ValueError(f"{where} has {len(intact)} intact episodes ({len(corrupt)} corrupt: {corrupt}), "
                             f"{needed} needed ({counts}); pass fewer episodes or another --data path")
        chosen = np.array(intact)
    if store.lengths()[chosen].max() < cfg.window:
        raise ValueError(f"the episodes of {str(store.path)!r} are shorter than window={cfg.window}")
    return chosen[:cfg.train_episodes], chosen[cfg.train_episodes:]


def load_split(store, cfg: TrainConfig, episodes: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, val) episodes in memory: obs uint8 (N, T, H, W, C), action (N, T, a), state (N, T, s),
    reward (N, T), mask bool (N, T) (True = frame observed).

    ``episodes``: their (train, val) store indices (default ``split_episodes(store, cfg)``); T = the
    store's episode length (shorter episodes are zero-padded; windows never reach the padding)."""
    train, val = split_episodes(store, cfg) if episodes is None else episodes

    def stack(indices) -> dict[str, torch.Tensor]:
        keys = ("obs", "action", "state", "reward", "mask")
        episodes = [store.window(int(i), 0, store.episode_length, keys=keys) for i in indices]
        return {key: torch.from_numpy(np.stack([e[key] for e in episodes])) for key in keys}

    return stack(train), stack(val)


class WindowSampler:
    """Window indices of step s: ``batch_size`` draws from a generator seeded by (seed, s); rank r keeps
    its contiguous slice of this global batch. Stateless, hence exactly resumable."""

    def __init__(self, n_windows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of ranks ({world})")
        self.n, self.batch, self.seed = n_windows, batch_size, seed
        self.lo, self.hi = rank * batch_size // world, (rank + 1) * batch_size // world

    def __call__(self, step: int) -> list[int]:
        return np.random.default_rng([self.seed, step]).integers(0, self.n, self.batch)[self.lo:self.hi].tolist()


class _StepBatches(torch.utils.data.Sampler):
    """DataLoader batch_sampler yielding the window indices of steps start+1 .. stop."""

    def __init__(self, sampler: WindowSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self):
        return (self.sampler(step) for step in range(self.start + 1, self.stop + 1))

    def __len__(self) -> int:
        return self.stop - self.start


def window_batch(windows, data: dict[str, torch.Tensor], indices: list[int]):
    """Windows ``indices`` of SequenceWindows ``windows``, gathered from in-memory episodes ``data``
    (whose rows are ``windows.episodes``, in order): dict of (B, L, ...) tensors."""
    located = np.array([windows.position(i) for i in indices]).reshape(-1, 2)
    row = torch.as_tensor(located[:, 0])[:, None]
    t = torch.as_tensor(located[:, 1])[:, None] + torch.arange(windows.length)
    return {key: value[row, t] for key, value in data.items()}


def train_batches(cfg: TrainConfig, windows, data: dict[str, torch.Tensor], sampler: WindowSampler, start: int,
                  stop: int):
    """Batches of steps start+1 .. stop: gathered from memory (num_workers=0) or streamed from the store
    by DataLoader workers; both give the same windows."""
    if cfg.num_workers == 0:
        return (window_batch(windows, data, sampler(step)) for step in range(start + 1, stop + 1))
    return iter(torch.utils.data.DataLoader(windows, batch_sampler=_StepBatches(sampler, start, stop),
                                            num_workers=cfg.num_workers, persistent_workers=False))


def split_windows(store, cfg: TrainConfig, episodes: tuple[np.ndarray, np.ndarray]):
    """SequenceWindows of ``cfg.window`` frames over the (train, val) store indices ``episodes``
    (``split_episodes``)."""
    from worldmodel.datasets import SequenceWindows

    return tuple(SequenceWindows(store, cfg.window, episodes=indices) for indices in episodes)


def validation_batch(val_windows, val_data: dict[str, torch.Tensor], cfg: TrainConfig, rank: int = 0,
                     world: int = 1) -> dict[str, torch.Tensor]:
    """The fixed batch of the logged val_loss: this rank's slice of ``batch_size`` val windows
    (draw 0 of seed + 1), dict of (B / world, L, ...) tensors."""
    indices = WindowSampler(len(val_windows), cfg.batch_size, cfg.seed + 1, rank, world)(0)
    return window_batch(val_windows, val_data, indices)


def imported_store_settings(overrides: dict) -> dict:
    """The settings a run on an imported store (one with the group attr ``import``) takes from the store
    unless the user gave them: model.image_size / channels / action_dim, val_episodes (a fifth, at least
    1), train_episodes (the rest) and window (at most 32, at most the longest episode). {} otherwise."""
    data = overrides.get("data")
    if not data or not (Path(data) / "zarr.json").is_file():
        return {}
    from worldmodel.datasets import RolloutStore

    try:
        store = RolloutStore.open(data, read_only=True)
    except (ValueError, FileNotFoundError):
        return {}  # ensure_dataset names the problem
    if "import" not in store.meta or not len(store):
        return {}
    height, _, channels = store.obs_shape
    n = len(store)
    val = min(max(1, n // 5), max(n - 1, 1))
    settings = {"model.image_size": height, "model.channels": channels, "model.action_dim": store.action_dim,
                "val_episodes": val, "train_episodes": max(n - val, 1),
                "window": min(32, int(store.lengths().max()))}
    return {k: v for k, v in settings.items() if k not in overrides}


def is_imported(cfg: TrainConfig) -> bool:
    """Whether the run's data is a store made by worldmodel.datasets' importers (attr ``import``)."""
    if not cfg.data or not (Path(cfg.data) / "zarr.json").is_file():
        return False
    return "import" in json.loads((Path(cfg.data) / "zarr.json").read_text()).get("attributes", {})
