"""Training, evaluation and online-filter replay of a WorldModel: the library behind ``train.py``.

    config.py    TrainConfig (+ ModelConfig, EvalConfig, FilterConfig), RUN_CONTROL, config_difference
    data.py      the rollout store (built if missing), train / val split, WindowSampler, batches of step s
    ddp.py       ranks, process group, device selection, the few collectives the loop needs
    run.py       the run directory: config.json, metrics.jsonl, checkpoint.pt, RNG states, resume, load_run
    loop.py      train(cfg): the train loop, top to bottom; lr schedule, optimizer, Ctrl-C handling
    evaluate.py  readout R^2, baselines, k-step metrics, the table and figures; evaluate_run (`eval`)
    replay.py    replay_filter (`filter`): one episode frame by frame through WorldModel.step
    control.py   control (`control`): the collect-train-plan loop and the closed-loop evaluation

Everything a run writes lives in ``<out_dir>/<name>/`` (see run.py). Errors are exceptions (ValueError,
FileNotFoundError, FloatingPointError for a diverged loss; ``Interrupted`` after Ctrl-C has saved a
checkpoint); only ``train.py`` turns them into exit codes.
"""

from worldmodel.training.config import RUN_CONTROL, ControlConfig, EvalConfig, FilterConfig, TrainConfig, config_difference
from worldmodel.training.data import WindowSampler, ensure_dataset, load_split, train_batches, window_batch
from worldmodel.training.evaluate import evaluate, evaluate_run, readout_features, readout_targets, write_plots
from worldmodel.training.loop import Interrupted, build_model, lr_factor, make_optimizer, train
from worldmodel.training.replay import replay_filter
from worldmodel.training.run import load_run, read_metrics
from worldmodel.training.seeds import train_seeds

__all__ = ["RUN_CONTROL", "ControlConfig", "EvalConfig", "FilterConfig", "Interrupted", "TrainConfig", "WindowSampler",
           "build_model", "config_difference", "ensure_dataset", "evaluate", "evaluate_run", "load_run",
           "load_split", "lr_factor", "make_optimizer", "read_metrics", "readout_features", "readout_targets", "train_seeds",
           "replay_filter", "train", "train_batches", "window_batch", "write_plots"]
