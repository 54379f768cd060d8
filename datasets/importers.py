"""Outside data into a ``RolloutStore``: folders of videos, HDF5 / npz arrays, Minari and LeRobot datasets.

    import_videos("clips/", "data/clips.zarr", image_size=64, fps=10)      # one episode per video file
    import_arrays("demos.h5", "data/demos.zarr")                           # or a .npz, or a folder of them
    import_minari("~/.minari/datasets/NAME", "data/minari.zarr")           # main_data.hdf5, on disk
    import_lerobot("path/to/lerobot_dataset", "data/lerobot.zarr")         # LeRobot v2 layout, on disk

Every importer center-crops frames to a square and resizes them to ``image_size`` (RGB uint8; None
keeps the source size where the source allows), keeps actions, states and rewards where the source has
them (absent ones: ``action_dim`` / ``state_dim`` 0, rewards 0), shows a tqdm bar, and is resumable:
the store records which source each episode came from (group attr ``import_sources``: {source name:
[first episode, end episode)}, written before the episodes are appended, so an interrupted import is
redone from the source it stopped in) and the import settings (attr ``import``); a rerun imports only
the sources not yet in the store (new files in the folder included). A source that cannot be read is
named in a ``SourceSkippedWarning`` and skipped, or raises ValueError naming it with ``strict=True``.

Episode length: the store's ``episode_length`` T is the longest source (after frame-rate subsampling)
unless ``episode_length`` is given; a source longer than T is split into consecutive episodes of at
most T steps. Stores made here have ``env_id = "import:<kind>"`` and no ``make_env`` attr.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from .store import RolloutStore
from .video import VIDEO_SUFFIXES, as_frames, count_frames, keep_for_fps, read_video, resize_frames, video_backend

__all__ = ["ImportConfig", "SourceSkippedWarning", "import_arrays", "import_lerobot", "import_minari",
           "import_videos", "run_import"]

ARRAY_SUFFIXES = (".h5", ".hdf5", ".hdf", ".npz")


class SourceSkippedWarning(UserWarning):
    """A source file (or episode of one) could not be read and was skipped (``strict=False``)."""


@dataclass
class _Source:
    name: str                         # unique, recorded in the store: relative file name [+ "#episode"]
    length: Callable[[], int]         # steps after subsampling (raises for unreadable sources)
    load: Callable[[], dict]          # {"obs": (t, H, W, C) uint8, "action"?, "state"?, "reward"?} (raises)


def _natural(text: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _need(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"this importer needs {module}: pip install 'ldm-worldmodel[{extra}]' "
                          f"(or pip install {module})") from None


def _vectors(value, t: int, name: str) -> np.ndarray:
    """(t, d) float32 from (t,) or (t, ...) values (one-hot is not guessed: integer actions stay a column)."""
    value = np.asarray(value)
    if len(value) < t:
        raise ValueError(f"{name} has {len(value)} steps but the frames have {t}")
    value = value[:t].reshape(t, -1).astype(np.float32)
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{name} contains NaN or inf")
    return value


def _episode(obs, action=None, state=None, reward=None, image_size: int | None = None) -> dict:
    frames = as_frames(obs)
    if frames.shape[-1] == 4:
        frames = frames[..., :3]
    if not len(frames):
        raise ValueError("no frames")
    frames = resize_frames(frames, image_size)
    t = len(frames)
    empty = np.zeros((t, 0), np.float32)
    return {"obs": frames,
            "action": empty if action is None else _vectors(action, t, "action"),
            "state": empty if state is None else _vectors(state, t, "state"),
            "reward": None if reward is None else _vectors(reward, t, "reward")[:, 0]}


def _import(sources: list[_Source], store_path, kind: str, settings: dict, episode_length: int | None,
            strict: bool, progress: bool) -> RolloutStore:
    """Append the sources not yet in the store at ``store_path`` (created on the first readable one)."""
    path = Path(store_path)
    meta = json.loads(json.dumps({"kind": kind, **settings}))
    store = RolloutStore.open(path) if (path / "zarr.json").is_file() else None
    if store is not None and store.meta.get("import") != meta:
        raise ValueError(f"the store at {str(path)!r} was not made by this import (its attr 'import' is "
                         f"{store.meta.get('import')!r}, this import is {meta!r}); pass another store path")
    n = len(store) if store is not None else 0
    records = {k: v for k, v in (store.meta.get("import_sources", {}) if store else {}).items() if v[1] <= n}
    pending = [s for s in sources if s.name not in records]
    skipped: list[str] = []

    def fail(source: _Source, err: Exception) -> None:
        if strict:
            raise ValueError(f"cannot import {source.name!r}: {err}") from err
        warnings.warn(f"skipping {source.name!r}: {err}", SourceSkippedWarning, stacklevel=3)
        skipped.append(source.name)

    T = store.episode_length if store is not None else episode_length
    if T is None and pending:
        lengths = []
        for source in pending:
            try:
                lengths.append(int(source.length()))
            except Exception as err:  # a damaged file fails in many ways (h5py, zip, FFmpeg)
                fail(source, err)
        pending = [s for s in pending if s.name not in skipped]
        T = max(lengths, default=None)
    for source in tqdm(pending, desc=f"import {kind}", unit="src", disable=not progress):
        try:
            episode = source.load()
            if store is not None:
                for key, width in (("obs", store.obs_shape), ("action", (store.action_dim,)),
                                   ("state", (store.state_dim,))):
                    if tuple(episode[key].shape[1:]) != tuple(width):
                        raise ValueError(f"{key} has shape {episode[key].shape[1:]} per step, the store "
                                         f"{tuple(width)}")
        except Exception as err:
            fail(source, err)
            continue
        if store is None:
            store = RolloutStore.create(path, obs_shape=episode["obs"].shape[1:], action_dim=episode["action"].shape[1],
                                        state_dim=episode["state"].shape[1], env_id=f"import:{kind}")
            store.set_episode_length(T or len(episode["obs"]))  # (create(episode_length=T) fails: store.py bug)
            store.update_attrs(**{"import": meta, "import_sources": {}})
        starts = range(0, len(episode["obs"]), store.episode_length)
        first = len(store)
        records[source.name] = [first, first + len(starts)]
        store.update_attrs(import_sources=records)  # before the appends: an interrupted source is redone
        for a in starts:
            part = slice(a, a + store.episode_length)
            reward = None if episode["reward"] is None else episode["reward"][part]
            store.append(episode["obs"][part], episode["action"][part], episode["state"][part], reward)
    if store is None:
        raise ValueError(f"nothing imported into {str(path)!r}: no readable source"
                         + (f" ({len(skipped)} skipped)" if skipped else ""))
    return store


# ------------------------------------------------------------------------------------------ videos
def import_videos(src_dir, store_path, image_size: int = 64, fps: float | None = None, *,
                  episode_length: int | None = None, strict: bool = False, progress: bool = True) -> RolloutStore:
    """One episode per video file (mp4/webm/gif/avi/mkv/mov, searched recursively) of ``src_dir``, in
    natural name order: frames subsampled to ``fps`` (None: every frame), center-cropped and resized to
    ``image_size``; no actions or states (action_dim = state_dim = 0), rewards 0. Needs PyAV (or imageio)."""
    video_backend()
    root = Path(src_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no video folder at {str(root)!r}")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()),
                   key=lambda p: _natural(str(p.relative_to(root))))
    if not files:
        raise ValueError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {str(root)!r}")
    sources = [_Source(str(p.relative_to(root)), lambda p=p: count_frames(p, fps),
                       lambda p=p: _episode(read_video(p, image_size, fps))) for p in files]
    settings = {"source": str(root.resolve()), "image_size": image_size, "fps": fps}
    return _import(sources, store_path, "videos", settings, episode_length, strict, progress)


# ------------------------------------------------------------------------------------------ arrays
class _ArrayFile:
    """Keys -> lazy arrays of an HDF5 or npz file, with '/'-separated group paths in both."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix.lower() == ".npz":
            self._file = np.load(path, allow_pickle=False)
            self.keys = list(self._file.files)
        else:
            h5py = _need("h5py", "hdf5")
            self._file = h5py.File(path, "r")
            self.keys = []
            self._file.visititems(lambda name, obj: self.keys.append(name) if isinstance(obj, h5py.Dataset) else None)

    def __getitem__(self, key: str):
        return self._file[key]

    def get(self, key: str | None):
        return self._file[key][()] if key and key in self.keys else None

    def close(self):
        self._file.close()


def _array_sources(files: list[Path], root: Path, keys: dict, image_size) -> list[_Source]:
    obs_key = keys["obs"]
    sources = []
    for path in files:
        rel = str(path.relative_to(root)) if path != root else path.name
        try:
            f = _ArrayFile(path)
        except Exception as err:
            def broken(err=err):
                raise ValueError(f"unreadable file ({err})")
            sources.append(_Source(rel, broken, broken))
            continue
        try:
            if obs_key in f.keys and f[obs_key].ndim == 5:  # (N, T, H, W, C): a leading episode axis
                n, t = f[obs_key].shape[:2]
                for i in range(n):
                    sources.append(_Source(f"{rel}#{i}", lambda t=t: t, lambda p=path, i=i: _load_row(p, keys, i, image_size)))
            elif obs_key in f.keys:  # one episode (T, H, W[, C]) at the root
                t = f[obs_key].shape[0]
                sources.append(_Source(rel, lambda t=t: t, lambda p=path: _load_group(p, keys, "", image_size)))
            else:  # one group per episode: <group>/<obs_key>
                prefixes = sorted((k[: -len(obs_key)] for k in f.keys if k.endswith("/" + obs_key)), key=_natural)
                if not prefixes:
                    raise ValueError(f"no {obs_key!r} array, at the root or in groups (keys: {f.keys[:8]})")
                for prefix in prefixes:
                    t = f[prefix + obs_key].shape[0]
                    sources.append(_Source(f"{rel}#{prefix.rstrip('/')}", lambda t=t: t,
                                           lambda p=path, g=prefix: _load_group(p, keys, g, image_size)))
        except Exception as err:
            def broken(err=err):
                raise ValueError(f"unreadable file ({err})")
            sources.append(_Source(rel, broken, broken))
        finally:
            f.close()
    return sources


def _load_group(path: Path, keys: dict, prefix: str, image_size) -> dict:
    f = _ArrayFile(path)
    try:
        return _episode(*(f.get(prefix + keys[k] if keys[k] else None) for k in ("obs", "action", "state", "reward")),
                        image_size=image_size)
    finally:
        f.close()


def _load_row(path: Path, keys: dict, i: int, image_size) -> dict:
    f = _ArrayFile(path)
    try:
        return _episode(*((f[keys[k]][i] if keys[k] and keys[k] in f.keys else None)
                          for k in ("obs", "action", "state", "reward")), image_size=image_size)
    finally:
        f.close()


def import_arrays(path, store_path, obs_key: str = "obs", action_key: str | None = "action",
                  state_key: str | None = "state", reward_key: str | None = "reward", *,
                  image_size: int | None = None, episode_length: int | None = None, strict: bool = False,
                  progress: bool = True) -> RolloutStore:
    """Episodes from an HDF5 (.h5/.hdf5, needs h5py) or .npz file, or a folder of them. Layouts per file:
    ``obs`` of shape (N, T, H, W, C) (with ``action`` (N, T, ...), ... : a leading episode axis), ``obs``
    (T, H, W[, C]) (one episode), or one group per episode (``episode_0/obs``, ``episode_0/action``, ...;
    in npz the keys are the paths). Frames: uint8, or floats in [0, 1]; channel-first accepted; resized
    to ``image_size`` if given. Actions, states and rewards are kept where their key exists (pass None to
    leave one out); each is flattened to (t, d) float32."""
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted((p for p in root.rglob("*") if p.suffix.lower() in ARRAY_SUFFIXES),
                       key=lambda p: _natural(str(p.relative_to(root))))
        if not files:
            raise ValueError(f"no .h5/.hdf5/.npz files under {str(root)!r}")
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(f"no array file or folder at {str(root)!r}")
    if any(p.suffix.lower() != ".npz" for p in files):
        _need("h5py", "hdf5")
    keys = {"obs": obs_key, "action": action_key, "state": state_key, "reward": reward_key}
    sources = _array_sources(files, root if root.is_dir() else root.parent, keys, image_size)
    settings = {"source": str(root.resolve()), "image_size": image_size, "keys": keys}
    return _import(sources, store_path, "arrays", settings, episode_length, strict, progress)


# ------------------------------------------------------------------------------------------ Minari
def _minari_file(path: Path) -> Path:
    for candidate in (path, path / "data" / "main_data.hdf5", path / "main_data.hdf5"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no Minari dataset at {str(path)!r} (expected data/main_data.hdf5 in it)")


def _minari_images(group, obs_key: str | None):
    """The image observations (T+1, H, W, C) of a Minari episode group (an array, or a key of a dict)."""
    obs = group["observations"]
    if hasattr(obs, "shape"):
        if obs.ndim < 3:
            raise ValueError(f"observations have shape {obs.shape}: vectors, not images")
        return obs[()], None
    if obs_key is not None:
        if obs_key not in obs:
            raise ValueError(f"observations have no {obs_key!r} key (keys: {list(obs)})")
        chosen = obs_key
    else:
        images = [k for k in obs if hasattr(obs[k], "shape") and obs[k].ndim >= 3]
        if not images:
            raise ValueError(f"no image observations among the keys {list(obs)}")
        chosen = images[0]
    vectors = [obs[k][()] for k in sorted(obs) if k != chosen and hasattr(obs[k], "shape") and obs[k].ndim == 2]
    return obs[chosen][()], (np.concatenate(vectors, 1) if vectors else None)


def import_minari(path, store_path, image_size: int | None = 64, *, obs_key: str | None = None,
                  episode_length: int | None = None, strict: bool = False, progress: bool = True) -> RolloutStore:
    """A Minari dataset already on disk (its folder, e.g. ~/.minari/datasets/NAME, or its
    data/main_data.hdf5): each ``episode_<i>`` group's image ``observations`` (T+1 frames; the last,
    after the final action, is dropped so that action[t] follows obs[t]), ``actions`` and ``rewards``.
    Dict observations: the image entry ``obs_key`` (default: the first with image shape); their other
    vector entries, concatenated in key order, become the state. Vector-only datasets are refused."""
    h5py = _need("h5py", "hdf5")
    file = _minari_file(Path(path).expanduser())
    with h5py.File(file, "r") as f:
        names = sorted((k for k in f if k.startswith("episode_")), key=_natural)
        lengths = {k: int(f[k]["actions"].shape[0]) if "actions" in f[k] else 0 for k in names}
    if not names:
        raise ValueError(f"no episode_<i> groups in {str(file)!r}")

    def load(name: str) -> dict:
        with h5py.File(file, "r") as f:
            group = f[name]
            frames, state = _minari_images(group, obs_key)
            t = int(group["actions"].shape[0])
            return _episode(frames[:t], group["actions"][()], None if state is None else state[:t],
                            group["rewards"][()] if "rewards" in group else None, image_size=image_size)

    sources = [_Source(n, lambda n=n: lengths[n], lambda n=n: load(n)) for n in names]
    settings = {"source": str(file.resolve()), "image_size": image_size, "obs_key": obs_key}
    return _import(sources, store_path, "minari", settings, episode_length, strict, progress)


# ------------------------------------------------------------------------------------------ LeRobot
def import_lerobot(path, store_path, image_size: int = 64, fps: float | None = None, *, camera: str | None = None,
                   episode_length: int | None = None, strict: bool = False, progress: bool = True) -> RolloutStore:
    """A LeRobot v2 dataset on disk: ``meta/info.json``, ``data/chunk-*/episode_*.parquet`` (columns
    ``action``, ``observation.state``, ``next.reward`` when present, ``timestamp``) and one mp4 per episode
    and camera under ``videos/`` (``info.json``'s ``video_path``). ``camera``: the video feature to use
    (default: the first, e.g. ``observation.images.top``). Needs pyarrow and PyAV."""
    _need("pyarrow", "lerobot")
    import pyarrow.parquet as pq

    video_backend()
    root = Path(path).expanduser()
    info_file = root / "meta" / "info.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"no LeRobot dataset at {str(root)!r} (missing meta/info.json)")
    info = json.loads(info_file.read_text())
    if not str(info.get("codebase_version", "v2")).startswith("v2"):
        raise ValueError(f"LeRobot codebase_version {info.get('codebase_version')!r} is not supported (v2.x only)")
    cameras = [k for k, v in info.get("features", {}).items() if v.get("dtype") == "video"]
    if camera is None and not cameras:
        raise ValueError(f"the LeRobot dataset at {str(root)!r} has no video features")
    camera = camera or cameras[0]
    if camera not in cameras:
        raise ValueError(f"camera {camera!r} is not a video feature of the dataset (video features: {cameras})")
    template = info.get("video_path", "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    files = sorted(root.glob("data/chunk-*/episode_*.parquet"), key=lambda p: _natural(str(p)))
    if not files:
        raise ValueError(f"no data/chunk-*/episode_*.parquet files under {str(root)!r}")

    def columns(file: Path) -> dict:
        table = pq.read_table(file)
        return {name: table.column(name).to_pylist() for name in table.column_names}

    def load(file: Path) -> dict:
        index = int(re.findall(r"\d+", file.stem)[-1])
        chunk = int(re.findall(r"\d+", file.parent.name)[-1])
        video = root / template.format(episode_chunk=chunk, video_key=camera, episode_index=index)
        table = columns(file)
        frames = read_video(video, image_size, None)
        t = min(len(frames), len(table.get("timestamp", frames)))
        keep = keep_for_fps(np.asarray(table["timestamp"][:t]) if "timestamp" in table else np.arange(t)
                            / float(info.get("fps", 1)), fps)
        pick = lambda name: None if name not in table else np.asarray(table[name][:t], np.float32)[keep]
        return _episode(frames[:t][keep], pick("action"), pick("observation.state"), pick("next.reward"))

    def length(file: Path) -> int:
        table = pq.read_table(file, columns=["timestamp"])
        return int(keep_for_fps(np.asarray(table.column("timestamp").to_pylist()), fps).sum())

    sources = [_Source(str(p.relative_to(root)), lambda p=p: length(p), lambda p=p: load(p)) for p in files]
    settings = {"source": str(root.resolve()), "image_size": image_size, "fps": fps, "camera": camera}
    return _import(sources, store_path, "lerobot", settings, episode_length, strict, progress)


# ------------------------------------------------------------------------------------------ command line
@dataclass
class ImportConfig:
    """`train.py import`: one source option (--videos, --hdf5, --npz, --minari or --lerobot) and --data."""

    videos: str | None = field(default=None, metadata={"help": "folder of video files (mp4/webm/gif/avi), one "
                                                               "episode per file"})
    hdf5: str | None = field(default=None, metadata={"help": "HDF5 file (or folder of them) of episodes"})
    npz: str | None = field(default=None, metadata={"help": "npz file (or folder of them) of episodes"})
    minari: str | None = field(default=None, metadata={"help": "Minari dataset folder on disk (data/main_data.hdf5)"})
    lerobot: str | None = field(default=None, metadata={"help": "LeRobot v2 dataset folder on disk"})
    data: str | None = field(default=None, metadata={"help": "rollout store to create or extend (required)"})
    image_size: int | None = field(default=64, metadata={
        "help": "frames are center-cropped and resized to this square size (none = keep, arrays only)"})
    fps: float | None = field(default=None, metadata={"help": "subsample videos to this frame rate (none = all frames)"})
    episode_length: int | None = field(default=None, metadata={
        "help": "steps per stored episode; longer sources are split (none = the longest source)"})
    obs_key: str | None = field(default=None, metadata={
        "help": "array of the frames (hdf5/npz: default obs; minari: image key of dict observations; "
                "lerobot: the camera, e.g. observation.images.top)"})
    action_key: str = field(default="action", metadata={"help": "hdf5/npz: array of the actions, if present"})
    state_key: str = field(default="state", metadata={"help": "hdf5/npz: array of the states, if present"})
    reward_key: str = field(default="reward", metadata={"help": "hdf5/npz: array of the rewards, if present"})
    strict: bool = field(default=False, metadata={"help": "stop at the first unreadable source instead of "
                                                          "skipping it with a warning"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})

    SOURCES = ("videos", "hdf5", "npz", "minari", "lerobot")

    def __post_init__(self):
        given = [k for k in self.SOURCES if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one source, not {', '.join('--' + k for k in given)}")
        for name in ("image_size", "episode_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")

    def source(self) -> tuple[str, str]:
        """(kind, path) of the one source given; ValueError without one, or without --data."""
        given = [k for k in self.SOURCES if getattr(self, k) is not None]
        if not given:
            raise ValueError("give a source: --videos DIR, --hdf5 FILE, --npz FILE, --minari PATH or --lerobot PATH")
        if self.data is None:
            raise ValueError("give the store to write with --data OUT.zarr")
        return given[0], getattr(self, given[0])


def run_import(cfg: ImportConfig) -> RolloutStore:
    """Run the import ``cfg`` describes; prints a one-line summary."""
    kind, source = cfg.source()
    common = dict(episode_length=cfg.episode_length, strict=cfg.strict, progress=cfg.progress)
    if kind == "videos":
        store = import_videos(source, cfg.data, cfg.image_size or 64, cfg.fps, **common)
    elif kind in ("hdf5", "npz"):
        store = import_arrays(source, cfg.data, cfg.obs_key or "obs", cfg.action_key, cfg.state_key, cfg.reward_key,
                              image_size=cfg.image_size, **common)
    elif kind == "minari":
        store = import_minari(source, cfg.data, cfg.image_size, obs_key=cfg.obs_key, **common)
    else:
        store = import_lerobot(source, cfg.data, cfg.image_size or 64, cfg.fps, camera=cfg.obs_key, **common)
    print(f"{store!r}; train with: python train.py --data {cfg.data}", flush=True)
    return store

