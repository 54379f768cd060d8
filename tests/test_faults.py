"""Fault injection: every fault gives a clear error or an exact recovery, and nothing committed is lost.

SIGKILL (no handler runs) during data collection, during a checkpoint write and during training; NaN,
inf and mistyped inputs to WorldModel; truncated checkpoints. The subprocess tests are marked slow (they
stay in the default run); each waits for a file that marks its kill point, never blindly, and every wait
is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (the repository-root entry script)
from worldmodel.checkpoint import TRAINING_KEYS, read_checkpoint  # noqa: E402
from worldmodel.datasets import RolloutStore, collect, ou_policy  # noqa: E402
from worldmodel.envs import make_env  # noqa: E402
from worldmodel.model import ModelConfig, WorldModel  # noqa: E402
from worldmodel.training import TrainConfig, read_metrics  # noqa: E402
from worldmodel.training.run import append_jsonl  # noqa: E402

TIMEOUT = 120  # seconds: the bound of every wait for a subprocess (they take a few seconds on an idle box)


# ------------------------------------------------------------------------------------------- subprocesses
@contextlib.contextmanager
def _process(args: list[str], log: Path):
    """A Python subprocess from the repository root (output to ``log``), killed if still running at exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TIMEOUT)


def _wait_for(proc: subprocess.Popen, ready, what: str, log: Path) -> None:
    """Poll ``ready()`` until true; fail if the process exits first or TIMEOUT passes."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process exited with {proc.returncode} before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {TIMEOUT} s:\n{log.read_text()}")
        time.sleep(0.02)


def _sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL


# ------------------------------------------------------------------------------------------- 1. collection
COLLECT = dict(T=20, seed=7)
N_REF = 12


def _env():
    return make_env("pendulum", image_size=16, drop_prob=0.2)  # drops: masks with False entries too


def _collect(path: Path, n: int) -> RolloutStore:
    env = _env()
    try:
        return collect(env, ou_policy(env), n, COLLECT["T"], path, seed=COLLECT["seed"], progress=False)
    finally:
        env.close()


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory) -> RolloutStore:
    """An uninterrupted collection of N_REF episodes."""
    return _collect(tmp_path_factory.mktemp("ref") / "ref.zarr", N_REF)


# The collection script: collect(..., n) in a process that stops (sleeps, marking the point in a file) at
# one kill point of episode `at`:
#   written  every array of the episode is written, its commit (n_episodes = at + 1 in zarr.json) is not
#   commit   the new zarr.json is written to zarr's temporary file, not yet renamed into place
#   none     no pause (the test kills it at whatever point it has reached)
COLLECT_SCRIPT = """
import json, pathlib, sys, time
import zarr
from worldmodel.datasets import collect, ou_policy
from worldmodel.envs import make_env

path, n, point, at, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), pathlib.Path(sys.argv[5])
root = pathlib.Path(path).resolve()

def pause():
    marker.write_text("paused")
    time.sleep(600)

set_item = zarr.Array.__setitem__
def paused_set_item(self, key, value):
    set_item(self, key, value)
    if point == "written" and self.path == "length" and key == at:  # the episode's last array write
        pause()
zarr.Array.__setitem__ = paused_set_item

replace = pathlib.Path.replace
def paused_replace(self, target):
    target = pathlib.Path(target)
    if (point == "commit" and target.name == "zarr.json" and target.resolve().parent == root
            and json.loads(self.read_bytes())["attributes"].get("n_episodes") == at + 1):
        pause()
    return replace(self, target)
pathlib.Path.replace = paused_replace

env = make_env("pendulum", image_size=16, drop_prob=0.2)
collect(env, ou_policy(env), n, {T}, path, seed={seed}, progress=False)
""".format(**COLLECT)


def _assert_same_episodes(store: RolloutStore, reference: RolloutStore, n: int) -> None:
    assert len(store) == n
    assert np.array_equal(store.lengths(), reference.lengths()[:n])
    for i in range(n):
        got, want = store.episode(i), reference.episode(i)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), (i, key)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["written", "commit", "none"])
def test_sigkill_during_collection_keeps_committed_episodes_and_resumes_exactly(point, reference_store, tmp_path):
    path, marker, log = tmp_path / "store.zarr", tmp_path / "paused", tmp_path / "collect.log"
    script = tmp_path / "collect_script.py"
    script.write_text(COLLECT_SCRIPT)
    at = 3
    n_killed = N_REF if point != "none" else 10_000  # "none": killed long before it could finish

    def committed() -> int:
        try:
            return len(RolloutStore.open(path, read_only=True))
        except (FileNotFoundError, ValueError, KeyError):  # not created yet
            return 0

    with _process([str(script), str(path), str(n_killed), point, str(at), str(marker)], log) as proc:
        if point == "none":
            _wait_for(proc, lambda: committed() >= at, f"{at} committed episodes", log)
        else:
            _wait_for(proc, marker.exists, f"the pause at episode {at} ({point})", log)
        _sigkill(proc)

    killed = RolloutStore.open(path, read_only=True)
    k = len(killed)
    assert k == at if point != "none" else at <= k < N_REF
    _assert_same_episodes(killed, reference_store, k)  # every committed episode intact and readable
    with pytest.raises(IndexError, match=f"episode index {k} out of range"):  # no partial episode
        killed.episode(k)
    if point == "written":  # episode k is on disk (its first frame chunk), but not committed
        assert (path / "obs" / "c" / str(k)).is_dir()
    if point == "commit":  # the new group metadata never reached zarr.json: it is in zarr's temporary file
        assert [p.name.endswith(".partial") for p in path.iterdir()].count(True) == 1

    resumed = _collect(path, N_REF)  # the rerun continues at episode k
    assert not list(path.rglob("*.partial"))  # temporary files of the killed writes are cleaned up
    _assert_same_episodes(RolloutStore.open(path, read_only=True), reference_store, N_REF)
    assert resumed.meta == reference_store.meta


# ------------------------------------------------------------------------------------------- 2, 3. training runs
TINY_MODEL = ["--model.image-size", "16", "--model.pool", "1", "--model.depth", "4", "--model.latent-dim", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """argv(name, *extra) of a tiny run (steps=1000, ended early by --max-steps or a kill) on one shared
    12-episode 16x16 dataset, built here; ``tiny.reference(k)``: the run dir of an uninterrupted run to
    step k."""
    root = tmp_path_factory.mktemp("faults")
    base = ["--data", str(root / "tiny.zarr"), "--out-dir", str(root / "runs"), "--train-episodes", "8",
            "--val-episodes", "4", "--episode-length", "20", "--window", "8", "--batch-size", "8", "--steps", "1000",
            "--warmup", "2", "--log-every", "1", "--ckpt-every", "2", "--no-progress", "--no-plots", *TINY_MODEL]

    def argv(name: str, *extra: str) -> list[str]:
        return [*base, "--name", name, *extra]

    references: dict[int, Path] = {}

    def reference(steps: int) -> Path:
        if steps not in references:
            references[steps] = train.main(argv(f"reference-{steps}", "--max-steps", str(steps)))
        return references[steps]

    train.main(argv("build-data", "--max-steps", "0"))  # builds the dataset once, before any subprocess
    argv.root, argv.reference = root, reference
    return argv


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = (torch.load(d / "checkpoint.pt", weights_only=True)["state_dict"] for d in (a, b))
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key


def _train_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl train records without the timing fields."""
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "frames_per_s")}
            for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# train.py with one write stopped half-way: it writes the first half of the bytes, creates `marker` (holding
# the full size) and sleeps, a process killed mid-write. `fault`:
#   checkpoint.pt     the second torch.save (the periodic checkpoint of step 4 with --ckpt-every 2)
#   metrics-append    the metrics.jsonl record of step 5
#   NAME              the first non-empty Path.write_text to a file whose name starts with NAME
TRAIN_WITH_FAULT = """
import io, json, os, pathlib, runpy, sys, time
import torch
import worldmodel.training.loop as loop

fault, marker = sys.argv[1], pathlib.Path(sys.argv[2])

def stop(size):
    with open(f"{marker}.tmp", "w") as out:
        out.write(str(size))
    os.replace(f"{marker}.tmp", marker)  # the marker appears with its content
    time.sleep(600)

real_save, saves = torch.save, []
def half_save(obj, f, *args, **kwargs):
    saves.append(f)
    if len(saves) < 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    with open(f, "wb") as out:
        out.write(data[: len(data) // 2])
    stop(len(data))

real_append = loop.append_jsonl
def half_append(path, record):
    if record["step"] == 5:
        line = json.dumps(record) + "\\n"
        with open(path, "a") as out:
            out.write(line[: len(line) // 2])
        stop(len(line))
    real_append(path, record)

real_write_text = pathlib.Path.write_text
def half_write_text(self, data, *args, **kwargs):
    if self.name.startswith(fault) and data:
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        stop(len(data))
    return real_write_text(self, data, *args, **kwargs)

if fault == "checkpoint.pt":
    torch.save = half_save
elif fault == "metrics-append":
    loop.append_jsonl = half_append
else:
    pathlib.Path.write_text = half_write_text
sys.argv = ["train.py", *sys.argv[3:]]
runpy.run_path("train.py", run_name="__main__")
"""


def _train_killed_mid_write(tmp_path: Path, fault: str, argv: list[str]) -> int:
    """Run train.py ``argv`` with ``fault`` (see TRAIN_WITH_FAULT), SIGKILL it mid-write; the full size."""
    script, marker, log = tmp_path / "train_with_fault.py", tmp_path / "half-written", tmp_path / "train.log"
    script.write_text(TRAIN_WITH_FAULT)
    with _process([str(script), fault, str(marker), *argv], log) as proc:
        _wait_for(proc, marker.exists, f"the half-written {fault}", log)
        _sigkill(proc)
    return int(marker.read_text())


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_the_previous_checkpoint(tiny, tmp_path):
    run_dir = tiny.root / "runs" / "kill-save"
    size = _train_killed_mid_write(tmp_path, "checkpoint.pt", tiny("kill-save"))  # at step 4's checkpoint

    ckpt = run_dir / "checkpoint.pt"
    tmp = run_dir / "checkpoint.pt.tmp"  # write_checkpoint's temporary file, as the kill left it
    assert tmp.stat().st_size == size // 2
    assert read_checkpoint(ckpt, require=TRAINING_KEYS)["step"] == 2  # the previous checkpoint, whole
    WorldModel.load(ckpt)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "checkpoint.pt.tmp", "config.json",
                                                         "metrics.jsonl"]

    train.main(tiny("kill-save", "--resume", "--max-steps", "6"))
    assert read_checkpoint(ckpt, require=TRAINING_KEYS)["step"] == 6
    assert not tmp.exists()  # the next write replaced the leftover temporary file
    _assert_same_params(run_dir, tiny.reference(6))
    assert _train_records(run_dir) == _train_records(tiny.reference(6))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl"])
def test_sigkill_while_a_resume_rewrites_the_run_files_loses_nothing(tiny, tmp_path, name):
    """A resume rewrites config.json and (trimmed) metrics.jsonl before training: killed mid-write, the
    files keep their old content and the next --resume still continues exactly."""
    run_dir = tiny.root / "runs" / f"kill-rewrite-{name}"
    shutil.copytree(tiny.reference(4), run_dir)  # a run stopped at step 4 (the name is run control)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    _train_killed_mid_write(tmp_path, name, tiny(run_dir.name, "--resume", "--max-steps", "6"))
    # each file holds its old content or (config.json, rewritten before metrics.jsonl) the complete new one
    for file in ("checkpoint.pt", "metrics.jsonl", *(("config.json",) if name == "config.json" else ())):
        assert (run_dir / file).read_bytes() == before[file], file
    TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))  # whole

    train.main(tiny(run_dir.name, "--resume", "--max-steps", "6"))
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    _assert_same_params(run_dir, tiny.reference(6))
    assert _train_records(run_dir) == _train_records(tiny.reference(6))


@pytest.mark.slow
def test_sigkill_mid_metrics_record_then_resume(tiny, tmp_path):
    """Killed while appending the record of step 5: the torn last line is skipped by readers and dropped
    by the next append and by --resume."""
    run_dir = tiny.root / "runs" / "kill-append"
    _train_killed_mid_write(tmp_path, "metrics-append", tiny("kill-append"))
    assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")  # a torn last line
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert read_checkpoint(run_dir / "checkpoint.pt", require=TRAINING_KEYS)["step"] == 4
    append_jsonl(run_dir / "metrics.jsonl", {"kind": "eval", "step": 4})  # as `train.py eval` would
    assert [(r["kind"], r["step"]) for r in read_metrics(run_dir / "metrics.jsonl")] == [
        *(("train", step) for step in range(1, 5)), ("eval", 4)]

    train.main(tiny("kill-append", "--resume", "--max-steps", "6"))
    _assert_same_params(run_dir, tiny.reference(6))
    assert _train_records(run_dir) == _train_records(tiny.reference(6))


@pytest.mark.slow
def test_sigkill_during_training_resumes_bit_for_bit(tiny, tmp_path):
    run_dir, log = tiny.root / "runs" / "kill-train", tmp_path / "train.log"
    with _process(["train.py", *tiny("kill-train")], log) as proc:
        # step 5 logged: the periodic checkpoint of step 4 exists and at least one later step is lost
        _wait_for(proc, lambda: _logged_steps(run_dir) >= 5, "the record of step 5", log)
        _sigkill(proc)

    saved = read_checkpoint(run_dir / "checkpoint.pt", require=TRAINING_KEYS)["step"]
    logged = [r["step"] for r in _train_records(run_dir)]
    assert saved >= 4 and saved % 2 == 0 and logged == list(range(1, len(logged) + 1)) and len(logged) >= saved
    assert "interrupted" not in log.read_text()  # SIGKILL: no handler ran, nothing was saved at the kill

    final = saved + 2
    train.main(tiny("kill-train", "--resume", "--max-steps", str(final)))
    _assert_same_params(run_dir, tiny.reference(final))
    # the records of steps after the surviving checkpoint were dropped and logged again, identically
    assert _train_records(run_dir) == _train_records(tiny.reference(final))
    assert [r["step"] for r in _train_records(run_dir)] == list(range(1, final + 1))


# ------------------------------------------------------------------------------------------- 5. unreadable run files
@pytest.fixture
def truncated_run(tiny):
    """A run whose checkpoint.pt was cut to half its bytes (config.json and metrics.jsonl intact)."""
    run_dir = tiny.reference(2)
    broken = tiny.root / "runs" / "truncated"
    broken.mkdir(exist_ok=True)
    for name in ("config.json", "metrics.jsonl"):
        (broken / name).write_bytes((run_dir / name).read_bytes())
    data = (run_dir / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return broken


@pytest.mark.parametrize("keep", [0.5, 0.0, 0.99])
def test_worldmodel_load_of_a_cut_checkpoint_names_the_file(tmp_path, keep):
    model = WorldModel.from_config(ModelConfig(image_size=16, channels=3, pool=1, depth=4, latent_dim=4))
    model.save(tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + " is not a torch file"):
        WorldModel.load(path)


@pytest.mark.slow
def test_truncated_checkpoint_gives_clear_errors(tiny, truncated_run):
    path = truncated_run / "checkpoint.pt"
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + " is not a torch file"):
        WorldModel.load(path)
    before = {p.name: p.read_bytes() for p in truncated_run.iterdir()}
    argvs = {"eval": ["train.py", "eval", "--out-dir", str(tiny.root / "runs"), "--name", "truncated",
                      "--no-progress", "--no-plots"],
             "resume": ["train.py", *tiny("truncated", "--resume", "--max-steps", "4")]}
    logs = {what: truncated_run.parent / f"truncated-{what}.log" for what in argvs}
    with _process(argvs["eval"], logs["eval"]) as eval_proc, _process(argvs["resume"], logs["resume"]) as resume_proc:
        codes = {"eval": eval_proc.wait(timeout=TIMEOUT), "resume": resume_proc.wait(timeout=TIMEOUT)}
    for what, log in logs.items():
        output = log.read_text()
        assert codes[what] == 1, output
        assert output.startswith("error: ") and "Traceback" not in output, output
        assert f"{str(path)!r} is not a torch file" in output, output
    assert {p.name: p.read_bytes() for p in truncated_run.iterdir()} == before  # a failed run changes nothing


@pytest.mark.slow
@pytest.mark.parametrize("text", ['{"name": "cut', "[1, 2]", '{"no_such_field": 1}'])
def test_unreadable_config_json_gives_a_clear_error(tiny, text):
    run_dir = tiny.root / "runs" / "bad-config"
    shutil.copytree(tiny.reference(2), run_dir, dirs_exist_ok=True)
    (run_dir / "config.json").write_text(text)
    message = f"^error: cannot read the run's settings {re.escape(repr(str(run_dir / 'config.json')))}: "
    for argv in (["eval", "--out-dir", str(tiny.root / "runs"), "--name", "bad-config"],
                 tiny("bad-config", "--resume")):
        with pytest.raises(SystemExit, match=message):
            train.main(argv)


# ------------------------------------------------------------------------------------------- 4, 6. bad model inputs
B, T = 3, 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WorldModel.from_config(ModelConfig(image_size=16, channels=3, pool=1, depth=4, latent_dim=4, action_dim=1))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (B, T, 16, 16, 3), dtype=torch.uint8, generator=g)
    return frames.float() / 255 - 0.5, torch.randn(B, T, 1, generator=g)


def _with_nan(frames):
    """NaN in a whole frame (0, 3) and in one value of frame (1, 5); the mask that drops the same frames."""
    bad = frames.clone()
    bad[0, 3] = float("nan")
    bad[1, 5, 2, 2, 1] = float("nan")
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3] = mask[1, 5] = False
    return bad, mask


def test_nan_frames_count_as_dropped_in_loss(model, batch, single_thread):
    """loss: "NaN frames are also treated as dropped" -- the same loss and gradients as the mask."""
    frames, actions = batch
    bad, mask = _with_nan(frames)
    model.train()
    grads = []
    for args in ((bad, actions), (frames, actions, mask)):
        model.zero_grad()
        out = model.loss(*args)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert model.loss(bad, actions).loss.item() == model.loss(frames, actions, mask).loss.item()
    assert all(torch.isfinite(g).all() and torch.allclose(g, h, atol=1e-6) for g, h in zip(*grads))
    model.zero_grad()
    all_nan = torch.full_like(frames, float("nan"))
    with pytest.raises(ValueError, match="at least 2 observed latents"):  # nothing observed: no loss to take
        model.loss(all_nan, actions)


def test_nan_frames_count_as_dropped_in_filter_and_step(model, batch, single_thread):
    """filter: "Missing frames (mask False or NaN) are only predicted"; step: "a frame with NaN only predicts"."""
    frames, actions = batch
    bad, mask = _with_nan(frames)
    model.eval()
    with torch.no_grad():
        by_nan, by_mask = model.filter(bad, actions), model.filter(frames, actions, mask)
        for a, b in ((by_nan.filtered, by_mask.filtered), (by_nan.predicted, by_mask.predicted)):
            assert torch.isfinite(a.mean).all() and torch.isfinite(a.cov).all()
            assert torch.equal(a.mean, b.mean) and torch.equal(a.cov, b.cov)
        belief = model.init_belief(B)
        for frame in (bad[:, 3], torch.full_like(frames[:, 0], float("nan"))):
            stepped, predicted = model.step(belief, frame, actions[:, 0]), model.step(belief, None, actions[:, 0])
            assert torch.isfinite(stepped.mean).all()
            assert torch.equal(stepped.mean[0], predicted.mean[0]) and torch.equal(stepped.cov[0], predicted.cov[0])


@pytest.mark.parametrize("where", ["whole frame", "one value"])
def test_inf_frames_are_refused(model, batch, where, single_thread):
    frames, actions = batch
    bad = frames.clone()
    if where == "whole frame":
        bad[0, 3] = float("inf")
    else:
        bad[1, 5, 2, 2, 1] = -float("inf")
    message = "frames contain inf"
    with pytest.raises(ValueError, match=message):
        model.train().loss(bad, actions)
    with pytest.raises(ValueError, match=message):
        model.eval().filter(bad, actions)
    with pytest.raises(ValueError, match=message):
        model.step(model.init_belief(B), bad[:, 3] if where == "whole frame" else bad[:, 5], actions[:, 0])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_frames_of_a_wrong_dtype_are_refused(model, batch, dtype, single_thread):
    frames, actions = batch
    bad = (frames > 0).to(dtype)
    message = f"frames must be uint8 or floating point, got dtype {dtype}"
    for call in (lambda: model.train().loss(bad, actions), lambda: model.eval().filter(bad, actions),
                 lambda: model.step(model.init_belief(B), bad[:, 0])):
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


@pytest.mark.parametrize("shape", [(B, T, 16, 16, 1), (B, T, 32, 32, 3), (T, 16, 16, 3), (B, T, 16 * 16 * 3)])
def test_frames_of_a_wrong_shape_are_refused(model, batch, shape, single_thread):
    _, actions = batch
    bad = torch.zeros(shape, dtype=torch.uint8)
    message = re.escape(f"frames must have shape (B, T, 16, 16, 3) for this config (image_size=16, channels=3), "
                        f"got {shape}")
    with pytest.raises(ValueError, match=message):
        model.train().loss(bad, actions)
    with pytest.raises(ValueError, match=message):
        model.eval().filter(bad, actions)
    with pytest.raises(ValueError, match=re.escape("frames must have shape (B, 16, 16, 3)")):
        model.step(model.init_belief(B), bad[0])


BAD_ACTIONS = {
    "int64": (lambda a: a.long(), "actions must be floating point, got dtype torch.int64"),
    "bool": (lambda a: a > 0, "actions must be floating point, got dtype torch.bool"),
    "short": (lambda a: a[:, :-1], "actions must have shape (B, T, 1) matching frames (3, 8), got (3, 7, 1)"),
    "wide": (lambda a: a.expand(-1, -1, 2), "actions must have shape (B, T, 1) matching frames (3, 8), got (3, 8, 2)"),
    "2-d": (lambda a: a[..., 0], "actions must have shape (B, T, 1) matching frames (3, 8), got (3, 8)"),
}
BAD_MASKS = {
    "float": (lambda m: m.float(), "mask must be a bool tensor (True = observed), got dtype torch.float32"),
    "int64": (lambda m: m.long(), "mask must be a bool tensor (True = observed), got dtype torch.int64"),
    "short": (lambda m: m[:, :-1], "mask must have shape (B, T) = (3, 8), got (3, 7)"),
    "3-d": (lambda m: m[..., None], "mask must have shape (B, T) = (3, 8), got (3, 8, 1)"),
}


@pytest.mark.parametrize("kind", BAD_ACTIONS)
def test_actions_of_a_wrong_dtype_or_shape_are_refused(model, batch, kind, single_thread):
    frames, actions = batch
    change, message = BAD_ACTIONS[kind]
    with pytest.raises(ValueError, match=re.escape(message)):
        model.train().loss(frames, change(actions))
    with pytest.raises(ValueError, match=re.escape(message)):
        model.eval().filter(frames, change(actions))
    if kind != "short":  # one step's action (B, a) of the others is of a wrong dtype or shape too
        step_message = "action must be floating point" if kind in ("int64", "bool") else "action must have shape (3, 1)"
        with pytest.raises(ValueError, match=re.escape(step_message)):
            model.step(model.init_belief(B), frames[:, 0], change(actions)[:, 0])


@pytest.mark.parametrize("kind", BAD_MASKS)
def test_masks_of_a_wrong_dtype_or_shape_are_refused(model, batch, kind, single_thread):
    frames, actions = batch
    change, message = BAD_MASKS[kind]
    mask = torch.ones(B, T, dtype=torch.bool)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.train().loss(frames, actions, change(mask))
    with pytest.raises(ValueError, match=re.escape(message)):
        model.eval().filter(frames, actions, change(mask))
