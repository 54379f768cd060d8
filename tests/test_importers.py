"""worldmodel.datasets importers (videos, HDF5 / npz arrays, Minari, LeRobot) and `train.py import`, on
small files written here; a short train.py run on an imported store."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from worldmodel.datasets import (RolloutStore, SourceSkippedWarning, import_arrays, import_lerobot, import_minari,
                                 import_videos)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402

W, H, SIDE = 128, 96, 16  # source frames 128 wide, 96 high; a white 16-pixel square moving right


def square_frames(n: int, step: int = 4) -> np.ndarray:
    frames = np.zeros((n, H, W, 3), np.uint8)
    for t in range(n):
        x = 16 + step * t
        frames[t, 40:40 + SIDE, x:x + SIDE] = 255
    return frames


def expected_x(t: int, size: int, step: int = 4) -> float:
    """Centroid column of the square in frame t after the center crop (columns 16..112) and resize."""
    return (16 + step * t + SIDE / 2 - 16) * size / H - 0.5


def centroid_x(frame: np.ndarray) -> float:
    weight = frame[..., 0].astype(float)
    return float((weight.sum(0) * np.arange(frame.shape[1])).sum() / weight.sum())


def write_video(path: Path, frames: np.ndarray, fps: int = 20) -> None:
    av = pytest.importorskip("av")
    codec, pix_fmt = {".gif": ("gif", "rgb8"), ".webm": ("libvpx", "yuv420p")}.get(path.suffix, ("mpeg4", "yuv420p"))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def clips(tmp_path) -> Path:
    """Three clips of different lengths and containers: a.mp4 (12 frames), b.gif (20), c10.avi (16)."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for name, n in (("a.mp4", 12), ("b.gif", 20), ("c10.avi", 16)):
        write_video(folder / name, square_frames(n))
    return folder


# ------------------------------------------------------------------------------------------ videos
def test_import_videos_frames_lengths_and_content(clips, tmp_path):
    store = import_videos(clips, tmp_path / "v.zarr", image_size=32, progress=False)
    assert len(store) == 3 and store.obs_shape == (32, 32, 3)
    assert store.action_dim == 0 and store.state_dim == 0 and store.episode_length == 20
    assert store.lengths().tolist() == [12, 20, 16]
    assert store.meta["env_id"] == "import:videos"
    assert sorted(store.meta["import_sources"]) == ["a.mp4", "b.gif", "c10.avi"]
    for i in range(3):
        episode = store.episode(i)
        assert episode["obs"].dtype == np.uint8 and episode["action"].shape == (len(episode["obs"]), 0)
        for t in (0, len(episode["obs"]) // 2, len(episode["obs"]) - 1):
            assert centroid_x(episode["obs"][t]) == pytest.approx(expected_x(t, 32), abs=1.0)


def test_import_videos_fps_subsampling(clips, tmp_path):
    store = import_videos(clips, tmp_path / "v.zarr", image_size=32, fps=10, progress=False)
    assert store.lengths().tolist() == [6, 10, 8]  # every other frame of 20 fps clips
    obs = store.episode(1)["obs"]
    for t in range(len(obs)):
        assert centroid_x(obs[t]) == pytest.approx(expected_x(2 * t, 32), abs=1.0)


def test_import_videos_resumes_and_adds_new_files(clips, tmp_path, monkeypatch):
    from worldmodel.datasets import importers

    out = tmp_path / "v.zarr"
    real = importers.read_video
    calls = []

    def interrupted(path, *args):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while reading the second clip
        return real(path, *args)

    monkeypatch.setattr(importers, "read_video", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_videos(clips, out, image_size=16, progress=False)
    assert len(RolloutStore.open(out)) == 1
    monkeypatch.setattr(importers, "read_video", real)
    store = import_videos(clips, out, image_size=16, progress=False)
    assert len(store) == 3 and store.lengths().tolist() == [12, 20, 16]
    write_video(clips / "d.mp4", square_frames(8))
    loaded = []
    monkeypatch.setattr(importers, "read_video", lambda path, *a: loaded.append(Path(path).name) or real(path, *a))
    store = import_videos(clips, out, image_size=16, progress=False)
    assert loaded == ["d.mp4"] and len(store) == 4 and store.lengths()[3] == 8
    loaded.clear()
    assert len(import_videos(clips, out, image_size=16, progress=False)) == 4 and loaded == []
    with pytest.raises(ValueError, match="not made by this import"):
        import_videos(clips, out, image_size=32, progress=False)


def test_corrupt_video_is_named_and_skipped_or_fatal_with_strict(clips, tmp_path):
    (clips / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    with pytest.warns(SourceSkippedWarning, match="bad.mp4"):
        store = import_videos(clips, tmp_path / "v.zarr", image_size=16, progress=False)
    assert len(store) == 3 and "bad.mp4" not in store.meta["import_sources"]
    with pytest.raises(ValueError, match="bad.mp4"):
        import_videos(clips, tmp_path / "strict.zarr", image_size=16, strict=True, progress=False)


def test_longer_videos_are_split_at_episode_length(clips, tmp_path):
    store = import_videos(clips, tmp_path / "v.zarr", image_size=16, episode_length=10, progress=False)
    assert store.lengths().tolist() == [10, 2, 10, 10, 10, 6]
    assert store.meta["import_sources"]["b.gif"] == [2, 4]


# ------------------------------------------------------------------------------------------ arrays
def _episodes(n: int = 3, t: int = 10, size: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"obs": rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
             "action": rng.standard_normal((t, 2)).astype(np.float32),
             "state": rng.standard_normal((t, 4)).astype(np.float32),
             "reward": rng.standard_normal(t).astype(np.float32)} for _ in range(n)]


def _check(store, episodes, resized: int | None = None):
    assert len(store) == len(episodes) and store.action_dim == 2 and store.state_dim == 4
    for i, expected in enumerate(episodes):
        got = store.episode(i)
        for key in ("action", "state", "reward"):
            np.testing.assert_allclose(got[key], expected[key])
        if resized is None:
            np.testing.assert_array_equal(got["obs"], expected["obs"])
        else:
            assert got["obs"].shape == (len(expected["obs"]), resized, resized, 3)
            assert abs(got["obs"].astype(float).mean() - expected["obs"].astype(float).mean()) < 3


def test_import_hdf5_leading_axis_and_groups(tmp_path):
    h5py = pytest.importorskip("h5py")
    episodes = _episodes()
    with h5py.File(tmp_path / "stacked.h5", "w") as f:
        for key in episodes[0]:
            f[key] = np.stack([e[key] for e in episodes])
    with h5py.File(tmp_path / "groups.hdf5", "w") as f:
        for i, episode in enumerate(episodes):
            for key, value in episode.items():
                f[f"episode_{i}/{key}"] = value
    _check(import_arrays(tmp_path / "stacked.h5", tmp_path / "a.zarr", image_size=None, progress=False), episodes)
    _check(import_arrays(tmp_path / "groups.hdf5", tmp_path / "b.zarr", image_size=16, progress=False), episodes, 16)


def test_import_npz_both_layouts_and_missing_keys(tmp_path):
    episodes = _episodes(seed=1)
    np.savez(tmp_path / "stacked.npz", **{k: np.stack([e[k] for e in episodes]) for k in episodes[0]})
    np.savez(tmp_path / "groups.npz", **{f"episode_{i}/{k}": v for i, e in enumerate(episodes) for k, v in e.items()})
    _check(import_arrays(tmp_path / "stacked.npz", tmp_path / "a.zarr", progress=False), episodes)
    _check(import_arrays(tmp_path / "groups.npz", tmp_path / "b.zarr", progress=False), episodes)
    np.savez(tmp_path / "frames_only.npz", obs=np.stack([e["obs"] for e in episodes]).astype(np.float32) / 255)
    store = import_arrays(tmp_path / "frames_only.npz", tmp_path / "c.zarr", progress=False)
    assert store.action_dim == 0 and store.state_dim == 0
    assert np.abs(store.episode(0)["obs"].astype(int) - episodes[0]["obs"]).max() <= 1


def test_corrupt_array_file_in_a_folder_is_skipped(tmp_path):
    folder = tmp_path / "arrays"
    folder.mkdir()
    episodes = _episodes(n=2, seed=2)
    np.savez(folder / "a.npz", **{k: np.stack([e[k] for e in episodes]) for k in episodes[0]})
    (folder / "b.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.warns(SourceSkippedWarning, match="b.npz"):
        store = import_arrays(folder, tmp_path / "a.zarr", progress=False)
    _check(store, episodes)
    with pytest.raises(ValueError, match="b.npz"):
        import_arrays(folder, tmp_path / "b.zarr", strict=True, progress=False)


# ------------------------------------------------------------------------------------------ Minari / LeRobot
def test_import_minari_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    root = tmp_path / "minari" / "pixels-v0"
    (root / "data").mkdir(parents=True)
    episodes = _episodes(n=2, t=9, seed=3)
    with h5py.File(root / "data" / "main_data.hdf5", "w") as f:
        for i, e in enumerate(episodes):
            g = f.create_group(f"episode_{i}")
            g["observations/pixels"] = np.concatenate([e["obs"], e["obs"][-1:]])  # T+1 observations
            g["observations/proprio"] = np.concatenate([e["state"], e["state"][-1:]])
            g["actions"], g["rewards"] = e["action"], e["reward"]
            g["terminations"], g["truncations"] = np.zeros(9, bool), np.zeros(9, bool)
    _check(import_minari(root, tmp_path / "m.zarr", image_size=None, progress=False), episodes)


def test_import_lerobot_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "lerobot"
    (root / "meta").mkdir(parents=True)
    info = {"codebase_version": "v2.0", "fps": 20, "features": {
        "observation.images.top": {"dtype": "video", "shape": [H, W, 3]},
        "observation.state": {"dtype": "float32", "shape": [4]}, "action": {"dtype": "float32", "shape": [2]}},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    episodes = _episodes(n=2, t=12, seed=4)
    for i, e in enumerate(episodes):
        (root / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        video = root / "videos" / "chunk-000" / "observation.images.top" / f"episode_{i:06d}.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        write_video(video, square_frames(12))
        table = pa.table({"observation.state": e["state"].tolist(), "action": e["action"].tolist(),
                          "timestamp": (np.arange(12) / 20).tolist(), "frame_index": list(range(12)),
                          "episode_index": [i] * 12, "next.reward": e["reward"].tolist()})
        pq.write_table(table, root / "data" / "chunk-000" / f"episode_{i:06d}.parquet")
    store = import_lerobot(root, tmp_path / "l.zarr", image_size=32, progress=False)
    assert len(store) == 2 and store.obs_shape == (32, 32, 3) and store.lengths().tolist() == [12, 12]
    for i, e in enumerate(episodes):
        got = store.episode(i)
        np.testing.assert_allclose(got["action"], e["action"])
        np.testing.assert_allclose(got["state"], e["state"])
        np.testing.assert_allclose(got["reward"], e["reward"])
        assert centroid_x(got["obs"][5]) == pytest.approx(expected_x(5, 32), abs=1.0)
    assert import_lerobot(root, tmp_path / "half.zarr", fps=10, progress=False).lengths().tolist() == [6, 6]


# ------------------------------------------------------------------------------------------ command line
def test_import_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit):
        train.main(["import", "--help"])
    out = capsys.readouterr().out.split("options:")[1]  # the flags (the description quotes other commands)
    assert "--videos" in out and "--fps" in out and "--steps" not in out and "--method" not in out
    with pytest.raises(SystemExit, match="error: give a source"):
        train.main(["import", "--data", "x.zarr"])
    with pytest.raises(SystemExit, match="error: give one source"):
        train.main(["import", "--videos", "a", "--npz", "b", "--data", "x.zarr"])
    with pytest.raises(SystemExit, match="error: no video folder"):
        train.main(["import", "--videos", "/nonexistent/clips", "--data", "x.zarr"])


@pytest.mark.slow
def test_train_on_an_imported_video_store(tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(6):
        write_video(folder / f"clip{i}.mp4", square_frames(20 - i, step=3))
    data = str(tmp_path / "imported.zarr")
    store = train.main(["import", "--videos", str(folder), "--data", data, "--image-size", "16", "--no-progress"])
    assert len(store) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error", SourceSkippedWarning)
        run_dir = train.main(["--data", data, "--out-dir", str(tmp_path / "runs"), "--name", "imported", "--window",
                              "8", "--batch-size", "4", "--steps", "4", "--warmup", "1", "--log-every", "1",
                              "--ckpt-every", "2", "--no-progress", "--no-plots", "--model.pool", "1",
                              "--model.depth", "4", "--model.latent-dim", "4"])
    assert (run_dir / "checkpoint.pt").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["image_size"] == 16 and config["model"]["action_dim"] == 0
    assert (config["train_episodes"], config["val_episodes"]) == (5, 1)
    assert "readout evaluation is skipped" in capsys.readouterr().out
