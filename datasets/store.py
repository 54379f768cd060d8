"""Append-only zarr v3 rollout store that never loses a committed episode.

Layout (one zarr v3 group):

    obs     (N, T, H, W, C) uint8     chunk (1, T, H, W, C) (or (1, chunk_frames, ...)), blosc-zstd
    action  (N, T, a)       float32   chunk (1, T, a)
    state   (N, T, s)       float32   chunk (1, T, s)
    reward  (N, T)          float32   chunk (1, T)
    mask    (N, T)          bool      chunk (1, T)   True = frame observed (False: dropped frame)
    length  (N,)            int64     chunk (1024,)  valid steps of each episode (<= T, rest is padding)

Every chunk of every array ends with its crc32c checksum (zarr v3 ``crc32c`` codec after blosc-zstd), so a
damaged chunk is detected on read: ``episode``/``window`` raise ``CorruptEpisodeError`` naming the episode and
the array, and ``verify()`` lists every corrupt episode. Stores written before checksums were added read as
before; there only chunks that fail to decompress are detected (a flipped byte may pass unnoticed).

group attrs: format, format_version, env_id, env_kwargs, seed, obs_shape, action_dim, state_dim,
episode_length (T, fixed by the first append unless given at create), chunk_frames,
compression_level, ``n_episodes``,
and user metadata set with ``update_attrs`` (``collect`` adds ``make_env``).

``action[t]`` is the action taken after observing ``obs[t]`` (RL convention); ``reward[t]`` is the
reward it earned.

Atomic append: episode k = n_episodes is written to index k of every array (growing their capacity
geometrically first, so arrays may be allocated beyond n_episodes; unwritten chunks cost no disk),
and only then committed by rewriting the group attrs with ``n_episodes = k + 1`` (zarr's local store
writes every file to a temporary name and renames it into place, so each file is either old or new).
Readers trust only episodes < n_episodes. A crash mid-append leaves at most an invisible partial
episode k, which the next append overwrites. The store assumes a single writer at a time.

Stores on object storage (``memory://``, ``s3://``, ``gs://``, ... through ``zarr.storage.FsspecStore``;
``urls.py``) follow the same protocol: every chunk and metadata document is one key written by one
whole-object PUT, which object stores apply atomically (a reader gets the old object or the new one), and
zarr's blocking writes return only once every chunk of the episode is stored, so the commit (the group's
zarr.json with n_episodes = k + 1) is written strictly after them. A crashed writer leaves orphan chunks at
index k (and arrays grown beyond n_episodes), invisible to readers and overwritten by the next append.
``file://`` URLs are local paths (zarr's local store, with its temp-file renames).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec, Crc32cCodec

from . import urls

FORMAT = "ldm-worldmodel/rollouts"
FORMAT_VERSION = 1
_LENGTH_CHUNK = 1024
_EPISODE_ARRAYS = ("obs", "action", "state", "reward", "mask")
_DAMAGED_CHUNK = (ValueError, RuntimeError)  # raised by zarr's crc32c codec and by blosc on a damaged chunk


def _compressors(level: int) -> tuple[BloscCodec, Crc32cCodec]:
    """blosc-zstd, then a crc32c checksum of the compressed chunk."""
    return BloscCodec(cname="zstd", clevel=level, shuffle="shuffle"), Crc32cCodec()


class CorruptEpisodeError(ValueError):
    """A chunk of an episode failed its crc32c checksum or did not decompress.

    ``episode``: its index, ``array``: the array holding the chunk (obs, action, ...); both None when a
    DataLoader worker's error is re-raised in the main process (from the message alone).
    """

    def __init__(self, message: str, episode: int | None = None, array: str | None = None):
        super().__init__(message)
        self.episode, self.array = episode, array


def store_exists(where: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """True when a zarr group (a rollout store, or another zarr v3 group) is at ``where``: a local path or
    an fsspec URL (``urls.py``)."""
    where = urls.location(where)
    if isinstance(where, Path):
        return (where / "zarr.json").is_file()
    fs, root = urls.filesystem(where, storage_options)
    return bool(fs.isfile(f"{root}/zarr.json"))


def _open_group(where: Path | str, mode: str, storage_options: dict | None) -> zarr.Group:
    if isinstance(where, Path):
        return zarr.open_group(str(where), mode=mode, zarr_format=3)
    store = urls.fsspec_store(where, storage_options, read_only=mode == "r")
    return zarr.open_group(store=store, mode=mode, zarr_format=3)


class RolloutStore:
    """Episodes of (obs, action, state, reward, mask) in a zarr v3 group at ``path``.

    Build with ``RolloutStore.create`` or ``RolloutStore.open``; ``len(store)`` is the number of
    committed episodes. ``path``: a local ``Path`` (also for ``file://`` URLs), or the fsspec URL of a store
    on object storage (``memory://``, ``s3://``, ...) opened with ``storage_options``.
    """

    def __init__(self, path: Path | str, group: zarr.Group, read_only: bool, storage_options: dict | None = None):
        self.path, self._group, self.read_only = path, group, read_only
        self.storage_options = storage_options
        attrs = dict(group.attrs)
        self.obs_shape = tuple(attrs["obs_shape"])
        self.action_dim, self.state_dim = int(attrs["action_dim"]), int(attrs["state_dim"])
        self.episode_length = attrs["episode_length"]
        self._count = int(attrs["n_episodes"])
        self._arrays: dict[str, zarr.Array] = {}  # opened array handles (opening reads metadata from disk)

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        obs_shape: tuple[int, ...],
        action_dim: int,
        state_dim: int,
        env_id: str = "",
        env_kwargs: dict | None = None,
        seed: int | None = None,
        overwrite: bool = False,
        episode_length: int | None = None,
        chunk_frames: int | None = None,
        compression_level: int = 2,
        storage_options: dict | None = None,
    ) -> "RolloutStore":
        """Create an empty store at ``path`` (a local path or an fsspec URL such as ``s3://bucket/run.zarr``;
        ``storage_options``: the fsspec filesystem's options, e.g. credentials or an endpoint).
        ``episode_length`` T is fixed by the first append unless given.

        ``chunk_frames``: frames per obs chunk (default: the whole episode, one chunk per episode).
        Chunks never span episodes. A random window decodes every chunk it touches, so for frames that
        compress badly (pixel noise) or long episodes, ~20-50 frames per chunk streams about twice as
        fast (bench/data.py --chunk-frames).
        ``compression_level``: blosc-zstd level 1-9; 2 balances write speed on noisy frames (about 1.5x
        level 3) against window decoding speed on clean ones (level 1 decodes markedly slower).
        """
        path = urls.location(path)
        obs_shape = tuple(int(s) for s in obs_shape)
        if len(obs_shape) != 3 or min(obs_shape) < 1:
            raise ValueError(f"obs_shape must be (H, W, C) of positive ints, got {obs_shape!r}")
        for name, value in (("action_dim", action_dim), ("state_dim", state_dim)):
            if int(value) != value or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for name, value in (("episode_length", episode_length), ("chunk_frames", chunk_frames)):
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if compression_level not in range(1, 10):
            raise ValueError(f"compression_level must be an int in [1, 9], got {compression_level!r}")
        if isinstance(path, Path):
            is_file, non_empty = path.is_file(), path.is_dir() and any(path.iterdir())
        else:
            fs, root = urls.filesystem(path, storage_options)
            is_file = fs.isfile(root)
            non_empty = not is_file and fs.exists(root) and bool(fs.ls(root, detail=False))
        if is_file:
            raise FileExistsError(f"store path {str(path)!r} is a file, not a directory")
        if non_empty and not overwrite:
            raise FileExistsError(f"store path {str(path)!r} exists and is not empty; pass overwrite=True to replace it")
        try:
            json.dumps(env_kwargs or {})
        except TypeError as err:
            raise ValueError(f"env_kwargs must be JSON-serialisable: {err}") from None
        group = _open_group(path, "w", storage_options)
        group.attrs.update({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "env_id": str(env_id),
            "env_kwargs": env_kwargs or {},
            "seed": seed,
            "obs_shape": list(obs_shape),
            "action_dim": int(action_dim),
            "state_dim": int(state_dim),
            "episode_length": None,  # set_episode_length below creates the arrays for a given T
            "chunk_frames": None if chunk_frames is None else int(chunk_frames),
            "compression_level": int(compression_level),
            "n_episodes": 0,
        })
        store = cls(path, group, read_only=False, storage_options=storage_options)
        if episode_length is not None:
            store.set_episode_length(int(episode_length))
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, read_only: bool = False, storage_options: dict | None = None
             ) -> "RolloutStore":
        """Open an existing store (a local path or an fsspec URL, see ``create``); FileNotFoundError if
        absent, ValueError if corrupt, of unknown version, or at a URL whose protocol fsspec cannot open."""
        path = urls.location(path)
        if not store_exists(path, storage_options):
            raise FileNotFoundError(f"no rollout store at {str(path)!r} (missing {f'{path}/zarr.json'!r})")
        try:
            group = _open_group(path, "r" if read_only else "r+", storage_options)
            attrs = dict(group.attrs)
        except Exception as err:  # zarr raises several types for unreadable metadata
            raise ValueError(f"corrupt rollout store at {str(path)!r}: unreadable group metadata ({err})") from err
        cls._check_attrs(path, attrs)
        store = cls(path, group, read_only, storage_options)
        store._check_arrays()
        if not read_only and isinstance(path, Path):
            for partial in path.rglob("*.partial"):  # temp files of writes interrupted by a crash
                partial.unlink(missing_ok=True)
        return store

    @staticmethod
    def _check_attrs(path: Path | str, attrs: dict) -> None:
        where = f"rollout store at {str(path)!r}"
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{where} is not a {FORMAT} store (group attr 'format' = {attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{where} has unknown format_version {attrs.get('format_version')!r}; "
                f"this version of worldmodel reads format_version {FORMAT_VERSION}"
            )
        checks = {
            "n_episodes": lambda v: isinstance(v, int) and v >= 0,
            "obs_shape": lambda v: isinstance(v, list) and len(v) == 3 and all(isinstance(s, int) and s > 0 for s in v),
            "action_dim": lambda v: isinstance(v, int) and v >= 0,
            "state_dim": lambda v: isinstance(v, int) and v >= 0,
            "episode_length": lambda v: v is None or (isinstance(v, int) and v > 0),
        }
        for key, ok in checks.items():
            if key not in attrs or not ok(attrs[key]):
                raise ValueError(f"corrupt {where}: group attr {key!r} = {attrs.get(key, '<missing>')!r}")

    def _expected_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        T = self.episode_length
        return {
            "obs": ((T, *self.obs_shape), "uint8"),
            "action": ((T, self.action_dim), "float32"),
            "state": ((T, self.state_dim), "float32"),
            "reward": ((T,), "float32"),
            "mask": ((T,), "bool"),
            "length": ((), "int64"),
        }

    def _check_arrays(self) -> None:
        if self.episode_length is None:
            if self._count:
                raise ValueError(f"corrupt rollout store at {str(self.path)!r}: episodes committed but no episode_length")
            return
        for name, (shape, dtype) in self._expected_shapes().items():
            try:
                array = self._array(name)
            except KeyError:
                raise ValueError(f"corrupt rollout store at {str(self.path)!r}: array {name!r} is missing") from None
            except Exception as err:
                raise ValueError(f"corrupt rollout store at {str(self.path)!r}: array {name!r} unreadable ({err})") from err
            if tuple(array.shape[1:]) != shape or array.shape[0] < self._count or str(array.dtype) != dtype:
                raise ValueError(
                    f"corrupt rollout store at {str(self.path)!r}: array {name!r} has shape {array.shape} and dtype "
                    f"{array.dtype}, expected (>= {self._count}, {', '.join(map(str, shape))}) of {dtype}"
                )
        try:
            lengths = self.lengths()
        except _DAMAGED_CHUNK as err:
            raise ValueError(f"corrupt rollout store at {str(self.path)!r}: array 'length' unreadable ({err})") from err
        if lengths.size and not (1 <= lengths.min() and lengths.max() <= self.episode_length):
            first = int(np.argmax((lengths < 1) | (lengths > self.episode_length)))
            raise ValueError(
                f"corrupt rollout store at {str(self.path)!r}: episode {first} has length {lengths[first]} "
                f"(n_episodes={self._count} claims episodes that were never written?)"
            )

    def set_episode_length(self, T: int) -> None:
        """Fix the episode length T of an empty store (otherwise the first append fixes it)."""
        if self.episode_length is not None:
            raise ValueError(f"episode_length is already {self.episode_length}")
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
            raise ValueError(f"T must be a positive int, got {T!r}")
        self._create_arrays(int(T))

    def _create_arrays(self, T: int) -> None:
        self.episode_length = T
        compressors = _compressors(self._group.attrs.get("compression_level", 2))
        for name, (shape, dtype) in self._expected_shapes().items():
            chunks = (_LENGTH_CHUNK,) if name == "length" else (1, *shape)
            if name == "obs" and self._group.attrs.get("chunk_frames"):
                chunks = (1, min(int(self._group.attrs["chunk_frames"]), T), *shape[1:])
            self._arrays[name] = self._group.create_array(
                name, shape=(0, *shape), chunks=chunks, dtype=dtype, compressors=compressors, fill_value=0, overwrite=True
            )
        self._group.attrs["episode_length"] = T

    # ------------------------------------------------------------------ writing
    _STRUCTURAL = ("format", "format_version", "n_episodes", "obs_shape", "action_dim", "state_dim", "episode_length")

    def update_attrs(self, **attrs) -> None:
        """Set user metadata (env_id, env_kwargs, seed, or new keys) in the group attrs; JSON values only."""
        if self.read_only:
            raise PermissionError(f"rollout store at {str(self.path)!r} was opened read_only")
        bad = sorted(set(attrs) & set(self._STRUCTURAL))
        if bad:
            raise ValueError(f"attrs {bad} describe the store's layout and cannot be changed")
        try:
            json.dumps(attrs)
        except TypeError as err:
            raise ValueError(f"attrs must be JSON-serialisable: {err}") from None
        self._group.attrs.update(attrs)

    def append(self, obs, action, state, reward=None, mask=None) -> int:
        """Append one episode atomically; returns its index.

        obs (t, H, W, C) uint8, action (t, a) float, state (t, s) float, reward (t,) float (default 0),
        mask (t,) bool (default all True), with 1 <= t <= T (shorter episodes are padded; their length
        is recorded). Float inputs are stored as float32 and must be finite.
        """
        if self.read_only:
            raise PermissionError(f"rollout store at {str(self.path)!r} was opened read_only")
        obs = np.asarray(obs)
        if obs.dtype != np.uint8:
            raise ValueError(f"obs must have dtype uint8, got {obs.dtype}")
        if obs.ndim != 4 or tuple(obs.shape[1:]) != self.obs_shape or len(obs) < 1:
            raise ValueError(f"obs must have shape (t, {', '.join(map(str, self.obs_shape))}) with t >= 1, got {obs.shape}")
        t = len(obs)
        T = self.episode_length or t
        if t > T:
            raise ValueError(f"obs has {t} steps but this store holds episodes of at most episode_length={T}")
        arrays = {"obs": obs}
        for name, value, width, default in (
            ("action", action, (self.action_dim,), None),
            ("state", state, (self.state_dim,), None),
            ("reward", reward, (), 0.0),
        ):
            if value is None and default is not None:
                value = np.full((t, *width), default, np.float32)
            value = np.asarray(value)
            if value.dtype.kind != "f":
                raise ValueError(f"{name} must have a floating dtype, got {value.dtype}")
            if value.shape != (t, *width):
                raise ValueError(f"{name} must have shape {(t, *width)} to match obs, got {value.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{name} contains NaN or inf")
            arrays[name] = value.astype(np.float32)
        mask = np.ones(t, bool) if mask is None else np.asarray(mask)
        if mask.dtype != bool or mask.shape != (t,):
            raise ValueError(f"mask must be a bool array of shape {(t,)}, got {mask.dtype} {mask.shape}")
        arrays["mask"] = mask

        if self.episode_length is None:
            self._create_arrays(T)
        k = self._count
        for name in (*arrays, "length"):  # grow capacity geometrically: few metadata rewrites
            array = self._array(name)
            if array.shape[0] < k + 1:
                array.resize((max(k + 1, 2 * array.shape[0], 8), *array.shape[1:]))
        for name, value in arrays.items():
            if t < T:
                value = np.concatenate([value, np.zeros((T - t, *value.shape[1:]), value.dtype)])
            self._array(name)[k] = value
        self._array("length")[k] = t
        self._group.attrs["n_episodes"] = k + 1  # the commit: one atomic metadata write
        self._count = k + 1
        return k

    # ------------------------------------------------------------------ reading
    @property
    def meta(self) -> dict:
        """The group attrs: format, format_version, env_id, env_kwargs, seed, shapes, n_episodes, ..."""
        return dict(self._group.attrs)

    def __len__(self) -> int:
        return self._count

    def _index(self, i: int) -> int:
        if not -self._count <= i < self._count:
            raise IndexError(f"episode index {i} out of range for a store with {self._count} episodes")
        return i % self._count

    def lengths(self) -> np.ndarray:
        """Valid steps of every committed episode, int64 (N,)."""
        if not self._count:
            return np.zeros(0, np.int64)
        return np.asarray(self._array("length")[: self._count])

    def _read(self, name: str, i: int, frames: slice) -> np.ndarray:
        """Frames ``frames`` of array ``name`` of committed episode i; CorruptEpisodeError when a chunk
        fails its checksum or decompression."""
        try:
            return np.asarray(self._array(name)[i, frames])
        except _DAMAGED_CHUNK as err:
            raise CorruptEpisodeError(
                f"episode {i} of the rollout store at {str(self.path)!r} is corrupt: a chunk of its {name!r} array "
                f"failed its checksum or decompression ({err}); RolloutStore.verify() lists every corrupt episode, "
                f"and train.py --skip-corrupt trains on the intact ones", episode=i, array=name) from err

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """Episode i as numpy arrays obs, action, state, reward, mask (trimmed to its length).
        CorruptEpisodeError if one of its chunks is damaged."""
        i = self._index(i)
        frames = slice(0, int(self._array("length")[i]))
        return {name: self._read(name, i, frames) for name in _EPISODE_ARRAYS}

    def window(self, i: int, start: int, stop: int, step: int = 1, keys=("obs", "action", "state", "mask")) -> dict:
        """Frames start:stop:step of episode i (no bounds trimming) for ``keys``. CorruptEpisodeError if
        a chunk it touches is damaged."""
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        i = self._index(i)
        return {name: self._read(name, i, slice(start, stop, step)) for name in keys}

    def verify(self, episodes=None, progress: bool = False) -> list[int]:
        """Indices of the corrupt episodes among ``episodes`` (default: all committed ones), ascending:
        those with a chunk of obs, action, state, reward or mask that fails its crc32c checksum or does
        not decompress. Reads every chunk of those episodes; ``progress``: a tqdm bar."""
        episodes = range(self._count) if episodes is None else sorted({self._index(int(i)) for i in episodes})
        corrupt = []
        for i in tqdm(episodes, desc="verify", unit="ep", disable=not progress):
            try:
                for name in _EPISODE_ARRAYS:
                    self._read(name, i, slice(None))
            except CorruptEpisodeError:
                corrupt.append(i)
        return corrupt

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Random episode-level split: (train_indices, val_indices), at least one of each when N >= 2."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        order = np.random.default_rng(seed).permutation(self._count)
        n_val = int(round(val_fraction * self._count))
        if val_fraction > 0 and self._count >= 2:
            n_val = min(max(n_val, 1), self._count - 1)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def __reduce__(self):
        """Pickle as (path, read_only, storage_options): a DataLoader worker reopens the store instead of
        sharing handles (a ``memory://`` store is private to its process, see ``urls.py``)."""
        return (RolloutStore.open, (str(self.path), self.read_only, self.storage_options))

    def __repr__(self) -> str:
        return (
            f"RolloutStore({str(self.path)!r}, episodes={self._count}, T={self.episode_length}, "
            f"obs={self.obs_shape}, action_dim={self.action_dim}, state_dim={self.state_dim}, env_id={self.meta.get('env_id')!r})"
        )
