"""worldmodel.training through train.py: exact resume, Ctrl-C checkpoints, DDP first-step loss, bad inputs
(the flags themselves: test_cli.py).

Training tests are tiny (12 episodes x 20 steps of 16x16 frames, a few optimizer steps) and marked slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (the repository-root entry script)
from worldmodel.training import TrainConfig, WindowSampler, lr_factor, read_metrics  # noqa: E402


# ------------------------------------------------------------------------------------------- schedule
def test_window_sampler_ranks_partition_the_global_batch():
    full = WindowSampler(1000, 8, seed=3)
    parts = [WindowSampler(1000, 8, seed=3, rank=r, world=2) for r in range(2)]
    for step in (1, 2, 50):
        assert parts[0](step) + parts[1](step) == full(step)
    assert full(1) == WindowSampler(1000, 8, seed=3)(1) and full(1) != full(2)
    with pytest.raises(ValueError, match="divisible"):
        WindowSampler(1000, 7, seed=0, rank=0, world=2)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(5, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------- training runs
TINY_MODEL = ["--model.image-size", "16", "--model.pool", "1", "--model.depth", "4", "--model.latent-dim", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """argv(name, *extra) of a tiny run sharing one 12-episode 16x16 dataset; runs go to a temp dir."""
    root = tmp_path_factory.mktemp("train")
    base = ["--data", str(root / "tiny.zarr"), "--out-dir", str(root / "runs"), "--train-episodes", "8",
            "--val-episodes", "4", "--episode-length", "20", "--window", "8", "--batch-size", "8", "--steps", "6",
            "--warmup", "2", "--log-every", "1", "--ckpt-every", "2", "--no-progress", "--eval.baselines",
            "--eval.ks", "1", "2", "--eval.burn-in", "2", "--no-plots", *TINY_MODEL]

    def argv(name: str, *extra: str) -> list[str]:
        return [*base, "--name", name, *extra]

    def run(name: str, *extra: str) -> list[str]:
        """the flags of eval / filter (run control only) for run ``name``"""
        return ["--out-dir", str(root / "runs"), "--name", name, "--no-progress", "--no-plots", *extra]

    argv.root, argv.run = root, run
    return argv


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["state_dict"]


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key


@pytest.mark.slow
def test_seeds_train_one_run_each_and_report_their_spread(tiny, capsys):
    """--seeds 3 5: a run and a data set per seed; seeds.json holds the mean, std, min and max of the runs' own
    final eval records; a repeat reuses the finished runs, and one more seed trains only that seed."""
    import statistics

    out = train.main(tiny("multi", "--seeds", "3", "5"))
    runs = tiny.root / "runs"
    records = {}
    for seed in (3, 5):
        run_dir = runs / f"multi-seed{seed}"
        assert json.loads((run_dir / "config.json").read_text())["seed"] == seed
        assert (tiny.root / f"tiny-seed{seed}.zarr").is_dir()
        records[seed] = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert records[3]["r2"]["kalman"] != records[5]["r2"]["kalman"]  # other data, init and windows
    summary = json.loads((runs / "multi" / "seeds.json").read_text())
    assert summary["seeds"] == [3, 5] and out["r2"] == summary["r2"]
    for i, name in enumerate(records[3]["targets"]):
        values = [records[s]["r2"]["kalman"][i] for s in (3, 5)]
        got = summary["r2"]["kalman"][i]
        assert got["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert got["std"] == pytest.approx(abs(values[0] - values[1]) / 2, abs=1e-12)
        assert (got["min"], got["max"]) == (min(values), max(values))
    cover = [records[s]["predictive"]["k=2"]["coverage_2sigma"] for s in (3, 5)]
    assert summary["predictive"]["k=2"]["coverage_2sigma"]["mean"] == pytest.approx(statistics.fmean(cover))
    assert "over seeds [3, 5]" in capsys.readouterr().out

    stamp = (runs / "multi-seed3" / "checkpoint.pt").stat().st_mtime_ns
    again = train.main(tiny("multi", "--seeds", "3", "5", "7"))
    assert (runs / "multi-seed3" / "checkpoint.pt").stat().st_mtime_ns == stamp  # reused, not trained again
    assert again["seeds"] == [3, 5, 7] and (runs / "multi-seed7" / "checkpoint.pt").is_file()
    with pytest.raises(SystemExit, match="distinct"):
        train.main(tiny("multi", "--seeds", "3", "3"))


@pytest.mark.slow
def test_default_outputs_and_exact_resume(tiny, capsys):
    full = train.main(tiny("full", "--plots"))
    for name in ("metrics.jsonl", "checkpoint.pt", "config.json", "loss.png", "readout.png", "kstep.png"):
        assert (full / name).stat().st_size > 0, name
    records = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    final = records[-1]
    assert final["kind"] == "eval" and len(final["r2"]["kalman"]) == 3 and set(final["predictive"]) == {"k=1", "k=2"}
    assert {"coverage_1sigma", "calibrated_1sigma", "calibrated_2sigma"} <= set(final["predictive"]["k=2"])
    # the bands were recalibrated after training, on the held-out episodes, up to the largest eval k
    from worldmodel.training import load_run
    from worldmodel.training.data import load_split, open_store
    from worldmodel.training.evaluate import calibrate

    model, cfg, _ = load_run(full)
    fitted = model.calibration.factors.clone()
    assert model.calibration.horizon == 2
    calibrate(model, cfg, load_split(open_store(cfg), cfg)[1])
    assert torch.allclose(model.calibration.factors, fitted)

    part = train.main(tiny("part", "--max-steps", "3"))
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 3
    assert all(r["kind"] == "train" for r in read_metrics(part / "metrics.jsonl"))
    train.main(tiny("part", "--resume"))
    _assert_same_params(full, part)
    losses = {r["step"]: r["loss"] for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "train"}
    assert {r["step"]: r["loss"] for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "train"} == losses

    # eval re-scores the checkpoint (same numbers) and appends; filter replays with dropped frames
    results = train.main(["eval", *tiny.run("full", "--eval.baselines", "untrained", "vicreg", "--eval.baseline-steps",
                                            "2", "--eval.ks", "1", "2", "--eval.burn-in", "2")])
    evals = [r for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 2 and evals[1]["r2"] == results["r2"] and list(results["r2"]) == ["kalman", "untrained",
                                                                                           "vicreg"]
    assert torch.load(full / "baseline-vicreg" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert evals[1]["r2"]["kalman"] == pytest.approx(evals[0]["r2"]["kalman"], abs=1e-9)
    capsys.readouterr()
    path = train.main(["filter", *tiny.run("full", "--filter.drop", "8", "14", "--filter.episode", "1")])
    assert path == full / "filter.png" and path.stat().st_size > 0
    gap = re.search(r"(\d+) dropped frames.*match the batch filter to (\S+) ", capsys.readouterr().out)
    assert gap and int(gap[1]) == 6 and float(gap[2]) < 1e-4  # online step() == batch filter(), with drops
    assert train.main(["filter", *tiny.run("full", "--filter.live", "--filter.length", "12")]).stat().st_size > 0


def _run_script(args: list[str]) -> subprocess.Popen:
    """Start a script from the repository root (same thread count as this process: bitwise comparable)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny):
    run_dir = tiny.root / "runs" / "sigint"
    proc = _run_script([sys.executable, "train.py", *tiny("sigint", "--steps", "1000")])
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output
    step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]
    assert 2 <= step < 1000 and "continue with --resume" in output
    train.main(tiny("sigint", "--steps", "1000", "--resume", "--max-steps", str(step + 2)))
    train.main(tiny("sigint-ref", "--steps", "1000", "--max-steps", str(step + 2)))
    _assert_same_params(run_dir, tiny.root / "runs" / "sigint-ref")


@pytest.mark.slow
def test_ddp_two_ranks_match_one_rank_first_step_loss(tiny):
    train.main(tiny("ddp1", "--steps", "1"))
    proc = _run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *tiny("ddp2", "--steps", "1")])
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    one, two = (read_metrics(tiny.root / "runs" / name / "metrics.jsonl")[0] for name in ("ddp1", "ddp2"))
    assert one["step"] == two["step"] == 1
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    # measured after the first update, whose DDP-averaged gradient differs in the last bits (Adam amplifies)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-3)


@pytest.mark.slow
def test_ddp_with_dropped_frames_matches_one_rank(tiny):
    """Frames dropped unevenly over the ranks (env drop_prob): torchrun no longer crashes in the latent
    normalisation's gather, and the loss equals the single-process one."""
    data = ["--data", str(tiny.root / "dropped.zarr"), "--env-kwargs", '{"friction": 0.5, "drop_prob": 0.25}']
    train.main(tiny("drop1", "--steps", "1", *data))
    proc = _run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *tiny("drop2", "--steps", "1", *data)])
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    one, two = (read_metrics(tiny.root / "runs" / name / "metrics.jsonl")[0] for name in ("drop1", "drop2"))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_bad_inputs_exit_with_clear_messages(tiny, tmp_path):
    from worldmodel.datasets import RolloutStore
    from worldmodel.model import WorldModel
    from worldmodel.training import train as train_run

    base = tiny.root / "runs" / "base"
    train.main(tiny("base", "--max-steps", "1"))  # also builds the shared dataset
    with pytest.raises(SystemExit, match="another config.*lr"):
        train.main(tiny("base", "--resume", "--lr", "0.5"))
    # eval scores the checkpoint with the settings of config.json (a restart of the run that has not saved
    # yet): refused when they differ
    stored = (base / "config.json").read_text()
    changed = json.loads(stored)
    changed["model"]["latent_dim"] = 6
    (base / "config.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="another config.*model.latent_dim"):
        train.main(["eval", *tiny.run("base")])
    (base / "config.json").write_text(stored)
    # the library raises exceptions; train.py turns them into 'error: ...' exits
    _, cfg = train.parse_args(tiny("wrong-size", "--model.image-size", "32"))
    with pytest.raises(ValueError, match="16x16 images.*image_size=32"):
        train_run(cfg)
    with pytest.raises(SystemExit, match="^error: the dataset .*16x16 images.*image_size=32"):
        train.main(tiny("wrong-size", "--model.image-size", "32"))
    with pytest.raises(SystemExit, match="built with make_env.*friction.*0.5.*asks for.*friction.*0.1"):
        train.main(tiny("other-env", "--env-kwargs", '{"friction": 0.1}'))
    with pytest.raises(SystemExit, match="1-dimensional actions; pass --model.action-dim 1"):
        train.main(tiny("no-actions", "--model.action-dim", "0"))
    RolloutStore.create(tmp_path / "empty.zarr", obs_shape=(16, 16, 3), action_dim=1, state_dim=2)
    with pytest.raises(SystemExit, match="is empty"):
        train.main(tiny("empty", "--data", str(tmp_path / "empty.zarr")))
    with pytest.raises(SystemExit, match="no run at"):
        train.main(["eval", *tiny.run("missing")])
    # a WorldModel.save file where a training checkpoint belongs
    model_only = tiny.root / "runs" / "model-only"
    model_only.mkdir()
    (model_only / "config.json").write_text(stored)
    WorldModel.load(base / "checkpoint.pt").save(model_only / "checkpoint.pt")
    with pytest.raises(SystemExit, match="not a training checkpoint.*WorldModel.save.*train_config"):
        train.main(["eval", *tiny.run("model-only")])
    ckpt = torch.load(base / "checkpoint.pt", weights_only=True)
    ckpt["state_dict"]["renamed"] = ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    torch.save(ckpt, base / "checkpoint.pt")
    before = {name: (base / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    with pytest.raises(SystemExit, match="does not match its config"):
        train.main(tiny("base", "--resume"))
    assert before == {name: (base / name).read_bytes() for name in before}  # a failed resume changes nothing


@pytest.mark.slow
def test_streamed_windows_equal_in_memory_windows(tiny):
    from worldmodel.datasets import SequenceWindows
    from worldmodel.training import ensure_dataset, load_split, train_batches

    _, cfg = train.parse_args(tiny("stream"))
    store = ensure_dataset(cfg)
    train_data, _ = load_split(store, cfg)
    windows = SequenceWindows(store, cfg.window, episodes=range(cfg.train_episodes))
    sampler = WindowSampler(len(windows), cfg.batch_size, cfg.seed)
    memory = list(train_batches(cfg, windows, train_data, sampler, start=2, stop=5))
    streamed = list(train_batches(dataclasses.replace(cfg, num_workers=1), windows, train_data, sampler, 2, 5))
    assert len(memory) == len(streamed) == 3
    for a, b in zip(memory, streamed):
        for key in ("obs", "action", "state", "mask"):
            assert torch.equal(a[key], b[key]), key
    # and they are the windows SequenceWindows itself returns for the sampled indices of step 3
    first = [windows[i] for i in sampler(3)]
    assert torch.equal(memory[0]["obs"], torch.stack([w["obs"] for w in first]))


@pytest.mark.slow
def test_corrupt_episode_is_named_or_skipped_with_the_same_episodes_in_memory_and_streamed(tiny, tmp_path, capsys):
    import shutil

    from test_store import corrupt_chunk
    from worldmodel.training import ensure_dataset, load_split, train_batches
    from worldmodel.training.data import split_episodes, split_windows, validation_batch

    shutil.copytree(ensure_dataset(train.parse_args(tiny("copy"))[1]).path, tmp_path / "bad.zarr")
    data = str(tmp_path / "bad.zarr")
    corrupt_chunk(data, "obs", 3)  # a train episode of the 12 (8 train + 4 val)
    with pytest.raises(SystemExit, match=rf"^error: episode 3 of the rollout store at '{data}' is corrupt: a chunk "
                                         r"of its 'obs' array.*verify\(\).*--skip-corrupt"):
        train.main(tiny("corrupt", "--data", data))
    with pytest.raises(SystemExit, match=r"^error: .* has 11 intact episodes \(1 corrupt: \[3\]\), 12 needed"):
        train.main(tiny("corrupt", "--data", data, "--skip-corrupt"))
    capsys.readouterr()
    run_dir = train.main(tiny("skip", "--data", data, "--skip-corrupt", "--train-episodes", "7"))
    out = capsys.readouterr().out
    assert out.count("warning: skipping the corrupt episodes [3] of the dataset") == 1
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["kind"] == "eval"
    assert "--skip-corrupt" in train.build_parser("train").format_help()

    # the next intact episodes take the place of episode 3; streamed windows equal the in-memory ones
    _, cfg = train.parse_args(tiny("skip", "--data", data, "--skip-corrupt", "--train-episodes", "7"))
    store = ensure_dataset(cfg)
    episodes = split_episodes(store, cfg)
    assert [list(e) for e in episodes] == [[0, 1, 2, 4, 5, 6, 7], [8, 9, 10, 11]]
    train_data, val_data = load_split(store, cfg, episodes)
    windows, val_windows = split_windows(store, cfg, episodes)
    sampler = WindowSampler(len(windows), cfg.batch_size, cfg.seed)
    memory = list(train_batches(cfg, windows, train_data, sampler, start=0, stop=3))
    streamed = list(train_batches(dataclasses.replace(cfg, num_workers=1), windows, train_data, sampler, 0, 3))
    for step, (a, b) in enumerate(zip(memory, streamed), start=1):
        want = [windows[i] for i in sampler(step)]
        for key in ("obs", "action", "state", "mask"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], torch.stack([w[key] for w in want])), key
    val_batch = validation_batch(val_windows, val_data, cfg)
    want = [val_windows[i] for i in WindowSampler(len(val_windows), cfg.batch_size, cfg.seed + 1)(0)]
    assert torch.equal(val_batch["obs"], torch.stack([w["obs"] for w in want]))


@pytest.mark.slow
def test_store_on_memory_url_trains_like_a_local_store(tiny):
    """--data memory://...: train.py builds the store there (same seed, same episodes), and the split, the
    batches and a 3-step run's losses equal those of the local store."""
    import uuid

    import fsspec

    from worldmodel.training import ensure_dataset, load_split, window_batch
    from worldmodel.training.data import split_episodes, split_windows

    name = f"/train-{uuid.uuid4().hex}"
    url = f"memory://{name}/tiny.zarr"
    try:
        local = train.main(tiny("url-local", "--steps", "3", "--data", str(tiny.root / "url-local.zarr")))
        remote = train.main(tiny("url-memory", "--steps", "3", "--data", url))
        stores = [ensure_dataset(train.parse_args(tiny(n, "--steps", "3", "--data", d))[1])
                  for n, d in (("url-local", str(tiny.root / "url-local.zarr")), ("url-memory", url))]
        assert stores[1].path == url and len(stores[1]) == len(stores[0]) == 12
        _, cfg = train.parse_args(tiny("url-memory", "--data", url))
        episodes = [split_episodes(store, cfg) for store in stores]
        assert [list(e) for e in episodes[0]] == [list(e) for e in episodes[1]]
        data = [load_split(store, cfg, e) for store, e in zip(stores, episodes)]
        for part in (0, 1):
            for key in ("obs", "action", "state", "mask"):
                assert torch.equal(data[0][part][key], data[1][part][key]), (part, key)
        windows = [split_windows(store, cfg, e)[0] for store, e in zip(stores, episodes)]
        indices = WindowSampler(len(windows[0]), cfg.batch_size, cfg.seed)(1)
        a, b = (window_batch(w, d[0], indices) for w, d in zip(windows, data))
        assert all(torch.equal(a[key], b[key]) for key in a)
        train_losses = [[(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
                        for run in (local, remote)]
        assert len(train_losses[0]) == 3 and train_losses[0] == train_losses[1]
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(name):
            fs.rm(name, recursive=True)


# ------------------------------------------------------------------------------------------- online monitoring
@pytest.mark.slow
def test_filter_scores_an_injected_teleport_above_the_normal_frames(tiny, capsys):
    """train.py filter --filter.inject teleport: the frames jump to another held-out episode (the one whose
    state is farthest at that step); the largest surprise over the first steps of the event exceeds the
    99th percentile of the surprise of the normal held-out frames. A freeze writes its trace too."""
    run_dir = train.main(tiny("surprise", "--steps", "60"))
    capsys.readouterr()
    path = train.main(["filter", *tiny.run("surprise", "--filter.inject", "teleport", "--filter.inject-at", "8",
                                           "--filter.inject-length", "3")])
    out = capsys.readouterr().out
    assert path == run_dir / "filter.png" and (run_dir / "surprise.png").stat().st_size > 0
    summary = json.loads((run_dir / "surprise.json").read_text())
    event = summary["event"]
    assert event["kind"] == "teleport" and (event["start"], event["stop"]) == (8, 11)
    assert event["source_episode"] not in (None, 0)  # another held-out episode than the replayed one (0)
    assert len(summary["surprise"]) == 20 and all(s is not None for s in summary["surprise"])
    assert summary["normal_frames"] == 4 * (20 - 5)  # observed held-out frames after the default eval.burn_in
    assert summary["batch_gap"] < 1e-3  # online WorldModel.surprise == the batch filter's -step log-likelihood
    print(f"teleport: max surprise {event['max_surprise']:.3f} at step {event['max_step']}, "
          f"normal p99 {summary['normal_p99']:.3f}", file=sys.stderr)
    assert event["max_surprise"] > summary["normal_p99"] and event["above_p99"]
    assert "injected teleport at step 8" in out and "above the 99th percentile" in out

    train.main(["filter", *tiny.run("surprise", "--filter.inject", "freeze", "--filter.episode", "1")])
    summary = json.loads((run_dir / "surprise.json").read_text())
    assert summary["event"]["kind"] == "freeze" and (summary["event"]["start"], summary["event"]["stop"]) == (10, 15)
    assert all(s is not None and s == s for s in summary["surprise"])
    with pytest.raises(SystemExit, match="inject-at must be in"):
        train.main(["filter", *tiny.run("surprise", "--filter.inject", "freeze", "--filter.inject-at", "20")])
    with pytest.raises(SystemExit) as exit_info:  # argparse: "'explode' is not one of ['teleport', 'freeze']"
        train.main(["filter", *tiny.run("surprise", "--filter.inject", "explode")])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_tensorboard_writes_the_metrics_scalars_and_figures(tiny):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.main(tiny("tb", "--steps", "3", "--max-steps", "2", "--tensorboard"))
    run_dir = train.main(tiny("tb", "--steps", "3", "--resume", "--tensorboard", "--plots"))
    board = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    logged = {e.step: e.value for e in board.Scalars("train/loss")}
    assert sorted(losses) == [1, 2, 3] and logged.keys() == losses.keys()
    assert all(logged[s] == pytest.approx(losses[s], rel=1e-6) for s in losses)
    evaluation = records[-1]
    assert evaluation["kind"] == "eval"
    r2 = board.Scalars(f"eval/r2/kalman/{evaluation['targets'][0]}")
    assert [e.step for e in r2] == [3] and r2[0].value == pytest.approx(evaluation["r2"]["kalman"][0], rel=1e-6)
    assert board.Scalars("eval/predictive/k=1/nll")[0].value == pytest.approx(evaluation["predictive"]["k=1"]["nll"],
                                                                              rel=1e-6)
    assert {"train/val_loss", "train/lr"} <= set(board.Tags()["scalars"])
    assert {"figures/loss", "figures/readout", "figures/kstep"} <= set(board.Tags()["images"])


@pytest.mark.slow
def test_tensorboard_missing_is_a_clear_error(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with pytest.raises(SystemExit, match="^error: --tensorboard needs the tensorboard package.*pip install tensorboard"):
        train.main(tiny("no-tb", "--steps", "1", "--tensorboard"))
    assert not (tiny.root / "runs" / "no-tb" / "metrics.jsonl").exists()
