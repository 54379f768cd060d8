"""RolloutStore: round trip, atomic append under SIGKILL, corrupt/unknown stores, checksummed chunks, bad input,
windows, collect."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch

from worldmodel.datasets import (CorruptEpisodeError, RolloutStore, SequenceWindows, collect, episode_seeds, ou_policy,
                                 random_policy)
from worldmodel.envs import make_env

OBS = (8, 8, 3)


def fake_episode(i, T=12):
    """Deterministic episode content keyed by its index."""
    rng = np.random.default_rng(i)
    return {
        "obs": rng.integers(0, 256, (T, *OBS), dtype=np.uint8),
        "action": rng.standard_normal((T, 2)).astype(np.float32),
        "state": rng.standard_normal((T, 3)).astype(np.float32),
        "reward": rng.standard_normal(T).astype(np.float32),
    }


def new_store(path, **kw):
    return RolloutStore.create(path, obs_shape=OBS, action_dim=2, state_dim=3, env_id="fake", seed=7, **kw)


def assert_episode_equal(got, want):
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_round_trip_and_metadata(tmp_path):
    store = new_store(tmp_path / "s.zarr", )
    assert len(store) == 0
    for i in range(3):
        assert store.append(**fake_episode(i)) == i
    short = fake_episode(3, T=5)
    store.append(**short, mask=np.arange(5) % 2 == 0)
    reopened = RolloutStore.open(tmp_path / "s.zarr", read_only=True)
    assert len(reopened) == 4 and reopened.episode_length == 12
    for i in range(3):
        assert_episode_equal(reopened.episode(i), fake_episode(i))
    assert_episode_equal(reopened.episode(3), short)
    np.testing.assert_array_equal(reopened.episode(3)["mask"], np.arange(5) % 2 == 0)
    np.testing.assert_array_equal(reopened.lengths(), [12, 12, 12, 5])
    meta = reopened.meta
    clone = pickle.loads(pickle.dumps(reopened))
    assert len(clone) == 4 and clone.read_only
    assert_episode_equal(clone.episode(2), fake_episode(2))
    assert meta["env_id"] == "fake" and meta["seed"] == 7 and meta["format_version"] == 1
    with pytest.raises(IndexError):
        reopened.episode(4)
    with pytest.raises(PermissionError):
        reopened.append(**fake_episode(5))
    writable = RolloutStore.open(tmp_path / "s.zarr")
    writable.update_attrs(note="hello", env_kwargs={"a": 1})
    assert RolloutStore.open(tmp_path / "s.zarr").meta["note"] == "hello"
    with pytest.raises(ValueError, match="layout"):
        writable.update_attrs(n_episodes=10)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        new_store(tmp_path / "file")
    # episodes are compressed, one chunk file per episode for obs
    obs_chunks = [f for f in (tmp_path / "s.zarr" / "obs").rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert len(obs_chunks) == 4


def test_time_chunked_store_round_trips(tmp_path):
    store = new_store(tmp_path / "s.zarr", chunk_frames=5, compression_level=4)
    for i in range(2):
        store.append(**fake_episode(i))
    reopened = RolloutStore.open(tmp_path / "s.zarr")
    obs = reopened._array("obs")
    assert obs.chunks == (1, 5, *OBS)
    assert (obs.compressors[0].cname.value, obs.compressors[0].clevel) == ("zstd", 4)
    assert_episode_equal(reopened.episode(1), fake_episode(1))
    with pytest.raises(ValueError, match="chunk_frames must be a positive int"):
        new_store(tmp_path / "t.zarr", chunk_frames=0)
    with pytest.raises(ValueError, match="compression_level"):
        new_store(tmp_path / "t.zarr", compression_level=0)


def test_split_is_by_episode_and_deterministic(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    for i in range(10):
        store.append(**fake_episode(i, T=4))
    train, val = store.split(0.2, seed=1)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert set(train) | set(val) == set(range(10))
    np.testing.assert_array_equal(store.split(0.2, seed=1)[1], val)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(obs=np.zeros((12, *OBS), np.float32)), "obs must have dtype uint8"),
        (dict(obs=np.zeros((12, 8, 9, 3), np.uint8)), r"obs must have shape \(t, 8, 8, 3\)"),
        (dict(obs=np.zeros((13, *OBS), np.uint8)), "episode_length=12"),
        (dict(action=np.zeros((12, 3), np.float32)), r"action must have shape \(12, 2\)"),
        (dict(action=np.zeros((12, 2), np.int64)), "action must have a floating dtype"),
        (dict(state=np.full((12, 3), np.nan, np.float32)), "state contains NaN"),
        (dict(reward=np.zeros(11, np.float32)), "reward must have shape"),
        (dict(mask=np.ones(12)), "mask must be a bool array"),
    ],
)
def test_append_rejects_bad_input_and_keeps_store_clean(tmp_path, bad, match):
    store = new_store(tmp_path / "s.zarr")
    store.append(**fake_episode(0))
    with pytest.raises(ValueError, match=match):
        store.append(**{**fake_episode(1), **bad})
    assert len(RolloutStore.open(tmp_path / "s.zarr")) == 1


def test_open_missing_corrupt_and_unknown_version(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rollout store"):
        RolloutStore.open(tmp_path / "absent.zarr")
    path = tmp_path / "s.zarr"
    new_store(path).append(**fake_episode(0))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        new_store(path)
    meta_file = path / "zarr.json"
    original = meta_file.read_text()

    def edit_attrs(**changes):
        meta = json.loads(original)
        meta["attributes"].update(changes)
        meta_file.write_text(json.dumps(meta))

    edit_attrs(format_version=99)
    with pytest.raises(ValueError, match="unknown format_version 99"):
        RolloutStore.open(path)
    edit_attrs(n_episodes="three")
    with pytest.raises(ValueError, match="corrupt.*n_episodes"):
        RolloutStore.open(path)
    edit_attrs(n_episodes=5)  # claims more episodes than were written
    with pytest.raises(ValueError, match="corrupt.*episode 1 has length 0"):
        RolloutStore.open(path)
    edit_attrs(n_episodes=50)  # more than the arrays can hold
    with pytest.raises(ValueError, match="corrupt.*array 'obs' has shape"):
        RolloutStore.open(path)
    edit_attrs()
    obs_meta = path / "obs" / "zarr.json"
    original_obs = obs_meta.read_text()
    meta = json.loads(original_obs)
    meta["shape"][1] += 1  # inconsistent episode length
    obs_meta.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="corrupt.*array 'obs' has shape"):
        RolloutStore.open(path)
    obs_meta.write_text(original_obs)
    RolloutStore.open(path)  # intact again
    edit_attrs(format="something-else")
    with pytest.raises(ValueError, match="not a ldm-worldmodel/rollouts store"):
        RolloutStore.open(path)
    meta_file.write_text("{ garbage")
    with pytest.raises(ValueError, match="corrupt rollout store"):
        RolloutStore.open(path)
    meta_file.write_text(original)
    (path / "state" / "zarr.json").unlink()
    with pytest.raises(ValueError, match="array 'state'"):
        RolloutStore.open(path)


def chunk_file(store_path, array: str, episode: int, chunk: int = 0) -> Path:
    """The file of chunk ``chunk`` (along time) of ``episode`` in ``array`` (of 1-d ``length``: its chunk
    ``episode``): zarr v3's default chunk keys <array>/c/<i>/<j>/0/..., one index per dimension."""
    ndim = len(json.loads(Path(store_path, array, "zarr.json").read_text())["shape"])
    return Path(store_path, array, "c", *map(str, [episode, chunk, *[0] * ndim][:ndim]))


def corrupt_chunk(store_path, array: str, episode: int, chunk: int = 0) -> None:
    """Flip 8 bytes in the middle of a chunk file (``chunk_file``)."""
    path = chunk_file(store_path, array, episode, chunk)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def test_new_stores_checksum_every_chunk(tmp_path):
    for name, kw in (("whole.zarr", {}), ("chunked.zarr", {"chunk_frames": 5})):
        new_store(tmp_path / name, **kw).append(**fake_episode(0))
        for array in ("obs", "action", "state", "reward", "mask", "length"):
            codecs = json.loads((tmp_path / name / array / "zarr.json").read_text())["codecs"]
            assert [c["name"] for c in codecs] == ["bytes", "blosc", "crc32c"], (name, array)


def test_corrupt_chunk_names_its_episode_and_verify_lists_it(tmp_path):
    path = tmp_path / "s.zarr"
    store = new_store(path)
    for i in range(4):
        store.append(**fake_episode(i))
    corrupt_chunk(path, "obs", 2)
    corrupt_chunk(path, "reward", 3)  # an array training does not keep in memory still marks its episode
    store = RolloutStore.open(path, read_only=True)
    for read in (lambda: store.episode(2), lambda: store.window(2, 0, 4, keys=("obs",)),
                 lambda: SequenceWindows(store, length=4, episodes=[2])[0]):
        with pytest.raises(CorruptEpisodeError, match=rf"episode 2 of the rollout store at '{path}' is corrupt: "
                                                      r"a chunk of its 'obs' array.*verify\(\).*--skip-corrupt") as err:
            read()
        assert (err.value.episode, err.value.array) == (2, "obs")
    with pytest.raises(CorruptEpisodeError, match="episode 3 .*'reward' array"):
        store.episode(-1)
    assert_episode_equal(store.episode(1), fake_episode(1))
    assert store.window(2, 0, 4, keys=("action",))["action"].shape == (4, 2)  # its other arrays are intact
    assert store.verify() == [2, 3] and store.verify(progress=True) == [2, 3]
    assert store.verify([0, 3, -2]) == [2, 3] and store.verify([1]) == []
    # time-chunked obs: only the damaged chunk fails
    chunked = new_store(tmp_path / "c.zarr", chunk_frames=5)
    for i in range(2):
        chunked.append(**fake_episode(i))
    corrupt_chunk(tmp_path / "c.zarr", "obs", 1, chunk=1)  # frames 5..9
    np.testing.assert_array_equal(chunked.window(1, 0, 5, keys=("obs",))["obs"], fake_episode(1)["obs"][:5])
    with pytest.raises(CorruptEpisodeError, match="episode 1 "):
        chunked.window(1, 4, 6, keys=("obs",))
    assert chunked.verify() == [1]
    # a damaged chunk of the episode lengths (shared by 1024 episodes) makes the whole store unreadable
    corrupt_chunk(path, "length", 0)
    with pytest.raises(ValueError, match=f"corrupt rollout store at '{path}': array 'length' unreadable"):
        RolloutStore.open(path)


def test_store_without_checksums_still_reads_and_verify_finds_undecodable_chunks(tmp_path, monkeypatch):
    import worldmodel.datasets.store as store_module
    from zarr.codecs import BloscCodec

    path = tmp_path / "old.zarr"
    with monkeypatch.context() as patch:  # the layout of stores written before checksums
        patch.setattr(store_module, "_compressors", lambda level: (BloscCodec(cname="zstd", clevel=level),))
        store = new_store(path)
        for i in range(3):
            store.append(**fake_episode(i))
    assert [c["name"] for c in json.loads((path / "obs" / "zarr.json").read_text())["codecs"]] == ["bytes", "blosc"]
    store = RolloutStore.open(path)
    assert_episode_equal(store.episode(2), fake_episode(2))
    assert store.verify() == []
    chunk_file(path, "obs", 1).write_bytes(b"not a blosc frame")
    with pytest.raises(CorruptEpisodeError, match="episode 1 .*'obs' array"):
        store.episode(1)
    assert store.verify() == [1]
    store.append(**fake_episode(3))  # appends to an old store keep its codecs
    assert_episode_equal(RolloutStore.open(path).episode(3), fake_episode(3))


WRITER = textwrap.dedent(
    """
    import sys, time, pathlib
    import numpy as np
    import zarr
    sys.path.insert(0, {tests!r})
    from test_store import fake_episode, new_store
    from worldmodel.datasets import RolloutStore

    path, n_before, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = new_store(path)
    for i in range(n_before):
        store.append(**fake_episode(i))
    signal_file = pathlib.Path(path + ".writing")
    if mode == "hook":
        # stop inside the append of episode n_before, after its obs chunk is on disk, before the commit
        original = zarr.Array.__setitem__
        def hooked(self, key, value):
            original(self, key, value)
            if self.path == "state":
                signal_file.write_text("x")
                time.sleep(60)
        zarr.Array.__setitem__ = hooked
        store.append(**fake_episode(n_before))
    else:
        i = n_before
        while True:  # keep appending; the parent kills at an arbitrary moment
            signal_file.write_text(str(i))
            store.append(**fake_episode(i))
            i += 1
    """
)


@pytest.mark.parametrize("mode", ["hook", "race"])
def test_sigkill_mid_append_keeps_every_committed_episode(tmp_path, mode):
    path = str(tmp_path / "s.zarr")
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=os.path.dirname(__file__)))
    child = subprocess.Popen([sys.executable, str(script), path, "3", mode])
    deadline = time.time() + 60
    while not os.path.exists(path + ".writing"):
        assert child.poll() is None, "writer died before writing"
        assert time.time() < deadline
        time.sleep(0.01)
    if mode == "race":
        time.sleep(0.3)  # several appends in flight
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    store = RolloutStore.open(path)
    n = len(store)
    assert n == 3 if mode == "hook" else n >= 3
    for i in range(n):
        assert_episode_equal(store.episode(i), fake_episode(i))
    # the partial episode is invisible and the next append overwrites it
    assert store.append(**fake_episode(100)) == n
    reopened = RolloutStore.open(path, read_only=True)
    assert len(reopened) == n + 1
    assert_episode_equal(reopened.episode(n), fake_episode(100))
    assert not list(tmp_path.rglob("*.partial"))


def test_windows_cover_episodes_with_frame_skip(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    for i in range(3):
        store.append(**fake_episode(i))
    store.append(**fake_episode(3, T=6))
    windows = SequenceWindows(store, length=4, frame_skip=2)  # span 7: the 6-step episode is skipped
    assert len(windows) == 3 * (12 - 7 + 1)
    for index in (0, 5, 7, len(windows) - 1):
        episode, start = windows.locate(index)
        want = fake_episode(episode)
        item = windows[index]
        np.testing.assert_array_equal(item["obs"].numpy(), want["obs"][start : start + 7 : 2])
        np.testing.assert_array_equal(item["state"].numpy(), want["state"][start : start + 7 : 2])
        groups = [range(t, min(t + 2, 12)) for t in range(start, start + 7, 2)]  # steps until the next frame
        expected_action = np.stack([want["action"][list(g)].mean(0) for g in groups])
        expected_reward = np.array([want["reward"][list(g)].sum() for g in groups])
        np.testing.assert_allclose(item["action"].numpy(), expected_action, rtol=1e-6)
        np.testing.assert_allclose(item["reward"].numpy(), expected_reward, rtol=1e-6)
    # chosen episodes keep their order and rows, including one too short for a window
    picked = SequenceWindows(store, length=4, frame_skip=2, episodes=[3, 2])
    assert list(picked.episodes) == [3, 2] and len(picked) == 6
    assert picked.position(0) == (1, 0) and picked.locate(0) == (2, 0) and picked.position(-1) == (1, 5)
    # at the end of an episode the last group holds only the remaining step
    last = SequenceWindows(store, length=2, frame_skip=3, episodes=[0])
    item = last[len(last) - 1]  # start 8: frames 8, 11; action groups [8, 9, 10], [11]
    np.testing.assert_allclose(item["action"][1].numpy(), fake_episode(0)["action"][11], rtol=1e-6)


def test_windows_bad_arguments(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    store.append(**fake_episode(0))
    with pytest.raises(ValueError, match="length must be an int in \\[1, 12\\]"):
        SequenceWindows(store, length=13)
    with pytest.raises(ValueError, match="length must be"):
        SequenceWindows(store, length=0)
    with pytest.raises(ValueError, match="length must be an int in \\[1, 6\\]"):
        SequenceWindows(store, length=7, frame_skip=2)
    with pytest.raises(ValueError, match="length must be"):
        SequenceWindows(store, length=2.5)
    with pytest.raises(ValueError, match="frame_skip"):
        SequenceWindows(store, length=2, frame_skip=0)
    with pytest.raises(ValueError, match="episodes must be indices"):
        SequenceWindows(store, length=2, episodes=[1])
    with pytest.raises(FileNotFoundError):
        SequenceWindows(tmp_path / "missing.zarr", length=2)


def test_windows_through_dataloader_with_two_workers(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    for i in range(4):
        store.append(**fake_episode(i))
    train, val = store.split(0.25, seed=0)
    windows = SequenceWindows(store, length=5, episodes=train)
    loader = torch.utils.data.DataLoader(windows, batch_size=4, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    seen = 0
    for batch in loader:
        assert batch["obs"].dtype == torch.uint8 and batch["obs"].shape[1:] == (5, *OBS)
        seen += len(batch["obs"])
    assert seen == len(windows) == 3 * 8
    assert set(windows.episodes) == set(train)


def test_collect_resumes_to_the_uninterrupted_result(tmp_path):
    env = make_env("pendulum", image_size=16)
    full = collect(env, ou_policy(env), 4, 10, tmp_path / "full.zarr", seed=3, progress=False)
    partial = collect(env, ou_policy(env), 2, 10, tmp_path / "part.zarr", seed=3, progress=False)
    assert len(partial) == 2
    resumed = collect(env, ou_policy(env), 4, 10, tmp_path / "part.zarr", seed=3, progress=False)
    assert len(resumed) == 4
    for i in range(4):
        assert_episode_equal(resumed.episode(i), full.episode(i))
    # the stored state is the env's state at the stored frame, and action[t] follows obs[t]
    episode = full.episode(2)
    env.reset(seed=episode_seeds(3, 2)[0])
    obs, _, _, _, info = env.step(episode["action"][0])
    np.testing.assert_array_equal(obs, episode["obs"][1])
    np.testing.assert_allclose(info["state"], episode["state"][1], rtol=1e-6)
    # the metadata rebuilds the env
    meta = RolloutStore.open(tmp_path / "full.zarr", read_only=True).meta
    assert (meta["env_id"], meta["env_kwargs"], meta["seed"]) == ("worldmodel/Pendulum-v0", {"image_size": 16}, 3)
    assert meta["make_env"] == {"name": "pendulum", "kwargs": {"image_size": 16}}
    rebuilt = make_env(meta["make_env"]["name"], **meta["make_env"]["kwargs"])
    np.testing.assert_array_equal(rebuilt.reset(seed=episode_seeds(3, 0)[0])[0], full.episode(0)["obs"][0])
    with pytest.raises(ValueError, match="seed=4 differs"):
        collect(env, ou_policy(env), 5, 10, tmp_path / "part.zarr", seed=4, progress=False)
    with pytest.raises(ValueError, match="action width 2 differs"):
        collect(make_env("nlink", image_size=16), random_policy(env), 5, 10, tmp_path / "part.zarr", seed=3, progress=False)
    with pytest.raises(ValueError, match="T=11 differs"):
        collect(env, ou_policy(env), 5, 11, tmp_path / "part.zarr", seed=3, progress=False)


def test_policies_are_seeded_smooth_and_in_bounds():
    env = make_env("pendulum", image_size=16)
    ou, uniform = ou_policy(env, theta=0.1, sigma=0.2), random_policy(env)
    traces = {}
    for name, policy in (("ou", ou), ("uniform", uniform)):
        policy.reset(np.random.default_rng(0))
        a = np.array([policy() for _ in range(4000)])[:, 0]
        policy.reset(np.random.default_rng(0))
        np.testing.assert_array_equal(a[:10], np.array([policy() for _ in range(10)])[:, 0])
        assert a.min() >= -2 and a.max() <= 2
        traces[name] = a
    lag1 = lambda a: np.corrcoef(a[:-1], a[1:])[0, 1]
    assert lag1(traces["ou"]) > 0.8 and abs(lag1(traces["uniform"])) < 0.1
    # stationary std of the OU process: sigma / sqrt(1 - (1 - theta)^2) in half-range units (2)
    unclipped = traces["ou"][np.abs(traces["ou"]) < 2]
    assert abs(np.std(traces["ou"]) - 2 * 0.2 / np.sqrt(1 - 0.81)) < 0.15 * 2 * 0.2 / np.sqrt(0.19)
    assert len(unclipped) > 0.9 * len(traces["ou"])


class Terminating(gymnasium.Wrapper):
    """The episode of env seed s ends after 3 + 2 (s % 3) steps."""

    def reset(self, **kw):
        self.t, self.limit = 0, 3 + 2 * (kw["seed"] % 3)
        return self.env.reset(**kw)

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        self.t += 1
        return obs, r, self.t >= self.limit, trunc, info


def test_collect_keeps_early_terminated_episodes_with_their_length(tmp_path):
    env = Terminating(make_env("pendulum", image_size=8))
    store = collect(env, ou_policy(env), 6, 8, tmp_path / "t.zarr", seed=0, progress=False)
    lengths = store.lengths()
    assert store.episode_length == 8 and set(lengths) <= {3, 5, 7} and len(set(lengths)) > 1
    assert all(len(store.episode(i)["obs"]) == n for i, n in enumerate(lengths))
    windows = SequenceWindows(store, length=4)
    assert len(windows) == sum(max(n - 3, 0) for n in lengths)


def test_collect_uncontrolled_env_with_frame_drops(tmp_path):
    env = make_env("balls", image_size=16, drop_prob=0.5)
    store = collect(env, random_policy(env), 2, 20, tmp_path / "balls.zarr", seed=0, progress=False)
    episode = store.episode(1)
    assert episode["action"].shape == (20, 0) and episode["state"].shape == (20, 8)
    dropped = ~episode["mask"]
    assert 0 < dropped.sum() < 20 and not dropped[0]
    assert np.all(episode["obs"][dropped] == 0) and np.all(episode["obs"][~dropped].max(axis=(1, 2, 3)) > 0)
    item = SequenceWindows(store, length=20)[1]
    np.testing.assert_array_equal(item["mask"].numpy(), episode["mask"])


# ------------------------------------------------------------------------------------------- fsspec URLs
@pytest.fixture
def memory_url():
    """A fresh memory:// store URL, removed afterwards (the memory filesystem is global to the process)."""
    import uuid

    import fsspec

    name = f"/rollouts-{uuid.uuid4().hex}"
    yield f"memory://{name}/s.zarr"
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_store_on_fsspec_url_round_trips(tmp_path, memory_url, kind):
    from worldmodel.datasets.store import store_exists

    url = memory_url if kind == "memory" else f"file://{tmp_path}/s.zarr"
    assert not store_exists(url)
    store = new_store(url, chunk_frames=5)
    assert store_exists(url) and store.path == (url if kind == "memory" else tmp_path / "s.zarr")
    for i in range(3):
        assert store.append(**fake_episode(i)) == i
    store.append(**fake_episode(3, T=5), mask=np.arange(5) % 2 == 0)
    with pytest.raises(FileExistsError, match="not empty"):
        new_store(url)
    reopened = RolloutStore.open(url + "/", read_only=True)  # a trailing slash names the same store
    assert len(reopened) == 4 and reopened.episode_length == 12 and reopened.meta["env_id"] == "fake"
    for i in range(3):
        assert_episode_equal(reopened.episode(i), fake_episode(i))
    assert_episode_equal(reopened.episode(3), fake_episode(3, T=5))
    np.testing.assert_array_equal(reopened.window(1, 2, 11, 3)["obs"], fake_episode(1)["obs"][2:11:3])
    assert reopened.verify() == [] and list(reopened.lengths()) == [12, 12, 12, 5]
    clone = pickle.loads(pickle.dumps(reopened))
    assert clone.read_only and clone.path == reopened.path and len(clone) == 4
    assert_episode_equal(clone.episode(2), fake_episode(2))
    with pytest.raises(PermissionError):
        reopened.append(**fake_episode(4))
    windows = SequenceWindows(url, length=4, episodes=[0, 3])
    assert len(windows) == 9 + 2
    np.testing.assert_array_equal(windows[10]["obs"], fake_episode(3, T=5)["obs"][1:5])
    # the same episodes as a local store: a fresh writer appends after the committed ones
    RolloutStore.open(url).append(**fake_episode(4))
    assert len(RolloutStore.open(url, read_only=True)) == 5
    fresh = new_store(url, overwrite=True)
    assert len(fresh) == 0 and len(RolloutStore.open(url)) == 0


def test_memory_store_crash_mid_append_is_invisible_and_overwritten(memory_url, monkeypatch):
    """On object storage the commit is the last write (the group's zarr.json with n_episodes): a writer that
    dies after any of the episode's writes leaves the store as it was, and the next append overwrites the
    orphan chunks."""
    from zarr.storage import FsspecStore

    store = new_store(memory_url)
    for i in range(2):
        store.append(**fake_episode(i))
    original_set, keys = FsspecStore.set, []

    async def recording_set(self, key, value, *args, **kwargs):
        keys.append(key)
        return await original_set(self, key, value, *args, **kwargs)

    monkeypatch.setattr(FsspecStore, "set", recording_set)
    store.append(**fake_episode(9))
    assert keys[-1] == "zarr.json" and keys.count("zarr.json") == 1  # the group attrs: the commit, last
    n_writes = len(keys)
    monkeypatch.setattr(FsspecStore, "set", original_set)
    store = RolloutStore.open(memory_url)
    store_len = len(store)  # 3 episodes: 0, 1, 9
    for dies_after in range(n_writes):
        calls = []

        async def dying_set(self, key, value, *args, **kwargs):
            if len(calls) == dies_after:
                raise OSError("writer killed")
            calls.append(key)
            return await original_set(self, key, value, *args, **kwargs)

        monkeypatch.setattr(FsspecStore, "set", dying_set)
        with pytest.raises(OSError, match="writer killed"):
            RolloutStore.open(memory_url).append(**fake_episode(100 + dies_after, T=7))
        monkeypatch.setattr(FsspecStore, "set", original_set)
        reader = RolloutStore.open(memory_url, read_only=True)
        assert len(reader) == store_len and reader.verify() == [], dies_after
        assert_episode_equal(reader.episode(-1), fake_episode(9))
    writer = RolloutStore.open(memory_url)
    assert writer.append(**fake_episode(5, T=7)) == store_len
    reader = RolloutStore.open(memory_url, read_only=True)
    assert_episode_equal(reader.episode(store_len), fake_episode(5, T=7))
    assert reader.lengths()[-1] == 7 and reader.verify() == []
    for i, want in enumerate((0, 1, 9)):
        assert_episode_equal(reader.episode(i), fake_episode(want))


def test_corrupt_chunk_on_memory_store_is_named_and_verified(memory_url):
    import fsspec

    store = new_store(memory_url)
    for i in range(3):
        store.append(**fake_episode(i))
    fs, key = fsspec.filesystem("memory"), memory_url[len("memory://"):] + "/obs/c/1/0/0/0/0"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    reader = RolloutStore.open(memory_url, read_only=True)
    with pytest.raises(CorruptEpisodeError, match=rf"episode 1 of the rollout store at '{memory_url}' is corrupt"):
        reader.episode(1)
    assert reader.verify() == [1]
    assert_episode_equal(reader.episode(2), fake_episode(2))


def test_bad_store_urls_raise_clear_errors(memory_url):
    import importlib.util

    with pytest.raises(ValueError, match=r"cannot open the rollout store 'nosuchproto://b/s.zarr': fsspec does not "
                                         r"know the 'nosuchproto' protocol"):
        RolloutStore.open("nosuchproto://b/s.zarr")
    with pytest.raises(ValueError, match="'nosuchproto' protocol"):
        new_store("nosuchproto://b/s.zarr")
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(ValueError, match=r"'s3://bucket/s.zarr': fsspec needs an extra package for the 's3' "
                                             r"protocol \(Install s3fs"):
            RolloutStore.open("s3://bucket/s.zarr")
    with pytest.raises(FileNotFoundError, match="no rollout store at 'memory://"):
        RolloutStore.open(memory_url)


def test_windows_through_dataloader_workers_on_a_file_url(tmp_path):
    """Workers reopen a URL store from its pickled URL (memory:// is private to a process: use file:// or
    object storage with workers)."""
    url = f"file://{tmp_path}/s.zarr"
    store = new_store(url)
    for i in range(4):
        store.append(**fake_episode(i))
    windows = SequenceWindows(url, length=5, episodes=[0, 2])
    loader = torch.utils.data.DataLoader(windows, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    batches = list(loader)
    obs = torch.cat([b["obs"] for b in batches])
    want = np.concatenate([[fake_episode(e)["obs"][t:t + 5] for t in range(8)] for e in (0, 2)])
    np.testing.assert_array_equal(obs.numpy(), want)


def test_create_with_a_given_episode_length(tmp_path):
    """episode_length at create fixes T before the first append (it used to fail: 'episode_length is already T')."""
    store = RolloutStore.create(tmp_path / "fixed.zarr", obs_shape=(4, 4, 3), action_dim=1, state_dim=2,
                                episode_length=6)
    assert store.episode_length == 6 and RolloutStore.open(tmp_path / "fixed.zarr").episode_length == 6
    store.append(np.zeros((6, 4, 4, 3), np.uint8), np.zeros((6, 1), np.float32), np.zeros((6, 2)), np.zeros(6))
    assert len(store) == 1 and store.episode(0)["obs"].shape == (6, 4, 4, 3)


class BatchedOU:
    """One OU policy per env of a batch, each reset with its episode's generator; interrupts at call ``stop``."""

    def __init__(self, env, stop=None):
        self.env, self.stop, self.calls = env, stop, 0

    def reset(self, rngs):
        self.policies = [ou_policy(self.env) for _ in rngs]
        for policy, rng in zip(self.policies, rngs):
            policy.reset(rng)

    def __call__(self, obs, infos):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        assert obs.shape == (len(self.policies), *self.env.observation_space.shape) and len(infos) == len(obs)
        return [policy(o, info) for policy, o, info in zip(self.policies, obs, infos)]


def test_batched_collect_equals_one_env_at_a_time_and_resumes(tmp_path):
    """Episodes in lockstep over 3 envs (batches of 3, 3, 1; episodes ending at different steps) store what one env
    collects episode by episode; an interrupted batch is collected again and the result is the same."""
    make = lambda: Terminating(make_env("pendulum", image_size=8))
    env = make()
    single = collect(env, ou_policy(env), 7, 8, tmp_path / "one.zarr", seed=2, progress=False)
    envs = [make() for _ in range(3)]
    batched = collect(envs, BatchedOU(env), 7, 8, tmp_path / "three.zarr", seed=2, progress=False)
    assert batched.lengths().tolist() == single.lengths().tolist() and len(set(single.lengths().tolist())) > 1
    for i in range(7):
        assert_episode_equal(batched.episode(i), single.episode(i))
    second_batch_step_2 = max(single.lengths()[:3]) + 2
    with pytest.raises(KeyboardInterrupt):
        collect(envs, BatchedOU(env, stop=second_batch_step_2), 7, 8, tmp_path / "cut.zarr", seed=2, progress=False)
    assert len(RolloutStore.open(tmp_path / "cut.zarr", read_only=True)) == 3
    resumed = collect(envs, BatchedOU(env), 7, 8, tmp_path / "cut.zarr", seed=2, progress=False)
    for i in range(7):
        assert_episode_equal(resumed.episode(i), single.episode(i))
    with pytest.raises(ValueError, match="action width 2 differs"):
        collect([env, make_env("nlink", image_size=8)], BatchedOU(env), 9, 8, tmp_path / "one.zarr", seed=2,
                progress=False)
