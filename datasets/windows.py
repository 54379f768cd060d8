"""Random fixed-length windows over the episodes of a ``RolloutStore``, as a torch Dataset."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .store import RolloutStore


class SequenceWindows(Dataset):
    """Every length-``length`` window (frames t, t + k, ..., t + (L-1) k with k = ``frame_skip``) inside
    the chosen episodes; shuffle the DataLoader to sample random windows across episodes.

    Item ``i`` is a dict of tensors:
        obs    uint8   (L, H, W, C)
        action float32 (L, a)   action[j] = mean of the actions taken at frames t_j .. t_j + k - 1
                                 (with k = 1: the action taken after observing obs[j])
        state  float32 (L, s)
        reward float32 (L,)     sum of the rewards over the same k steps
        mask   bool    (L,)     True = frame observed (False: dropped frame)

    Safe with DataLoader workers: only the path (or URL and storage options) is pickled; each process opens the store read-only on
    first use and caches the small per-episode arrays (action, state, reward, mask) of up to 4096
    episodes it touches.
    The set of episodes is fixed at construction (episodes appended later are not seen); ``episodes`` and
    ``lengths`` (N,) keep every chosen one in the given order, including those too short for a window.
    """

    _LOW_DIM = ("action", "state", "reward", "mask")
    _MAX_CACHED_EPISODES = 4096  # bounds the per-process cache of small arrays

    def __init__(self, store: RolloutStore | str | os.PathLike, length: int, episodes=None, frame_skip: int = 1,
                 storage_options: dict | None = None):
        if not isinstance(store, RolloutStore):
            store = RolloutStore.open(store, read_only=True, storage_options=storage_options)
        integral = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        if not integral(frame_skip) or frame_skip < 1:
            raise ValueError(f"frame_skip must be a positive int, got {frame_skip!r}")
        self.path, self.storage_options, self.frame_skip = store.path, store.storage_options, int(frame_skip)
        T = store.episode_length or 0
        max_length = (T - 1) // self.frame_skip + 1 if T else 0
        if not integral(length) or not 1 <= length <= max_length:
            raise ValueError(
                f"length must be an int in [1, {max_length}] for episode_length={T} and frame_skip={self.frame_skip}, "
                f"got {length!r}"
            )
        self.length, self.span = int(length), (int(length) - 1) * self.frame_skip + 1
        all_episodes = np.arange(len(store))
        episodes = all_episodes if episodes is None else np.asarray(episodes, np.int64).reshape(-1)
        if episodes.size and (episodes.min() < 0 or episodes.max() >= len(store)):
            raise ValueError(f"episodes must be indices in [0, {len(store)}), got min {episodes.min()} max {episodes.max()}")
        lengths = store.lengths()[episodes] if episodes.size else np.zeros(0, np.int64)
        self.episodes, self.lengths = episodes, lengths
        self._offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths - self.span + 1, 0))])
        if self._offsets[-1] == 0:
            raise ValueError(f"no episode among the {episodes.size} selected is long enough for length={length}")
        self._store, self._pid, self._cache = None, None, {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self):
        return {**self.__dict__, "_store": None, "_pid": None, "_cache": {}}

    def _open(self) -> RolloutStore:
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid, self._cache = (RolloutStore.open(self.path, read_only=True, storage_options=self.storage_options),
                                                 os.getpid(), {})
        return self._store

    def position(self, index: int) -> tuple[int, int]:
        """(r, start): window ``index`` starts at frame ``start`` of ``episodes[r]`` (r: the row of the chosen
        episodes loaded in memory in the given order)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"window index {index} out of range for {len(self)} windows")
        index %= len(self)
        r = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return r, int(index - self._offsets[r])

    def locate(self, index: int) -> tuple[int, int]:
        """(episode, start frame) of window ``index``."""
        r, start = self.position(index)
        return int(self.episodes[r]), start

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        store = self._open()
        r, start = self.position(index)
        episode, n_steps = int(self.episodes[r]), int(self.lengths[r])
        if episode not in self._cache:
            if len(self._cache) >= self._MAX_CACHED_EPISODES:
                self._cache.clear()
            self._cache[episode] = store.window(episode, 0, n_steps, keys=self._LOW_DIM)
        low = self._cache[episode]
        k, L = self.frame_skip, self.length
        frames = slice(start, start + self.span, k)
        obs = store.window(episode, frames.start, frames.stop, k, keys=("obs",))["obs"]
        # the k steps following each returned frame, excluding steps past the episode's end
        steps = np.arange(start, start + L * k).reshape(L, k)
        valid = steps < n_steps
        steps = np.minimum(steps, n_steps - 1)
        action = (low["action"][steps] * valid[..., None]).sum(1) / valid.sum(1)[:, None]
        reward = (low["reward"][steps] * valid).sum(1)
        return {
            "obs": torch.from_numpy(obs),
            "action": torch.from_numpy(action.astype(np.float32)),
            "state": torch.from_numpy(low["state"][frames].copy()),
            "reward": torch.from_numpy(reward.astype(np.float32)),
            "mask": torch.from_numpy(low["mask"][frames].copy()),
        }
