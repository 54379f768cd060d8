"""Image SSL end to end (``train.py ssl``): two augmented views of each image are a length-2 sequence, the
single-step special case of the LDM objective, so any preset of ``worldmodel.methods`` trains on them
through the same WorldModel, loop, checkpoints and resume as the sequence models.

Data: the built-in procedural shapes (known generative factors; ``data=None``), CIFAR-10/100 (a folder
holding ``cifar-10-batches-py`` / ``cifar-100-python``, or that folder itself) or an ImageNet-style folder
``root/<class>/<image>`` (a folder of images without class folders trains too; the probes are then
skipped). Every image is held in memory as uint8 on the training device; the views of step s are drawn
and augmented there (``SSLAugment`` on the batch) from a generator seeded by (seed, s), so a resumed run
replays its batches exactly and every rank of a multi-process run augments the same global batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from worldmodel.cli import config_from_dict
from worldmodel.datasets import CIFAR, ImageFolder, ProceduralShapes, SSLAugment
from worldmodel.datasets.augment import resize
from worldmodel.model import ModelConfig
from worldmodel.training import ddp
from worldmodel.training.loop import build_model, make_optimizer, run_steps
from worldmodel.training.run import prepare_run, restore, save_checkpoint, seed_all, start_files

__all__ = ["ImageSplits", "SSLConfig", "SSLEvalConfig", "load_images", "train_ssl", "view_batch"]


@dataclass
class SSLEvalConfig:
    """Evaluation of the backbone features: linear probe, kNN and (procedural images) factor R^2."""

    probe_images: int = field(default=5000, metadata={"help": "training images the probes are fit on"})
    test_images: int = field(default=2000, metadata={"help": "held-out images the probes are scored on"})
    knn_k: int = field(default=20, metadata={"help": "neighbours of the kNN classifier (cosine similarity)"})
    knn_temperature: float = field(default=0.07, metadata={"help": "temperature of the kNN vote weights"})
    batch_size: int = field(default=512, metadata={"help": "images per forward pass when encoding"})

    def __post_init__(self):
        if min(self.probe_images, self.test_images, self.knn_k, self.batch_size) < 1 or self.knn_temperature <= 0:
            raise ValueError("eval.probe_images, eval.test_images, eval.knn_k, eval.batch_size must be >= 1 and "
                             "eval.knn_temperature > 0")


def _ssl_model() -> ModelConfig:
    return ModelConfig(encoder="resnet", image_size=32, channels=3, depth=16, pool=1, hidden=512, latent_dim=64,
                       action_dim=0, method="vicreg")


@dataclass
class SSLConfig:
    """Everything an image-SSL run needs; ``train.py ssl`` generates its flags from these fields."""

    RUN_CONTROL = ("name", "out_dir", "device", "compile", "max_steps", "resume", "log_every", "ckpt_every", "eval",
                   "progress", "plots")

    name: str | None = field(default=None, metadata={"help": "run name: files go to <out_dir>/<name>/ "
                                                             "(none = ssl-<method>)"})
    out_dir: str = field(default="runs", metadata={"help": "parent directory of runs"})
    data: str | None = field(default=None, metadata={
        "help": "a CIFAR-10/100 folder (cifar-10-batches-py / cifar-100-python or its parent) or an image folder "
                "root/<class>/<image> on disk; nothing is downloaded (none = the built-in procedural shapes)"})
    images: int = field(default=10_000, metadata={
        "help": "procedural training images (also the cap on images read from a folder)"})
    steps: int = field(default=900, metadata={"help": "optimizer steps (sets the learning-rate schedule)"})
    batch_size: int = field(default=128, metadata={"help": "global batch of images (two views each) per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.01, metadata={"help": "cosine decay ends at lr * min_lr_ratio"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=10.0, metadata={"help": "max global gradient norm (0 = off)"})
    augment: dict = field(default_factory=dict, metadata={
        "help": "JSON overrides of worldmodel.datasets.SSLAugment (scale, jitter, jitter_p, gray_p, blur_p, flip_p)"})
    seed: int = field(default=0, metadata={"help": "seed of the model init, the images drawn and their views"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training loss"})
    log_every: int = field(default=25, metadata={"help": "steps between metrics.jsonl records"})
    ckpt_every: int = field(default=250, metadata={"help": "steps between periodic checkpoints"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop (with a checkpoint) at this step without changing the schedule; continue with --resume"})
    resume: bool = field(default=False, metadata={"help": "continue the run in <out_dir>/<name>/ from its checkpoint"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    plots: bool = field(default=True, metadata={"help": "write loss.png and features.png"})
    model: ModelConfig = field(default_factory=_ssl_model)
    eval: SSLEvalConfig = field(default_factory=SSLEvalConfig)

    window = 2  # the two views: a "sequence" of length 2 (frames per item, for the loop's frames_per_s)

    def __post_init__(self):
        for name in ("images", "steps", "batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or (self.max_steps is not None and self.max_steps < 0):
            raise ValueError("lr must be > 0, warmup >= 0 and max_steps >= 0")
        if self.model.resolved_encoder not in ("resnet", "conv"):
            raise ValueError(f"image SSL needs an image encoder (model.encoder resnet or conv), got "
                             f"{self.model.encoder!r}")
        if self.model.channels != 3 or self.model.image_size is None:
            raise ValueError("image SSL trains on RGB images: model.channels must be 3 and model.image_size set")
        SSLAugment(self.model.image_size, **self.augment)  # TypeError for an unknown setting

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / (self.name or f"ssl-{self.model.method}")

    def resolved(self) -> "SSLConfig":
        return dataclasses.replace(self, name=self.name or f"ssl-{self.model.method}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SSLConfig":
        return config_from_dict(cls, data)


# ---------------------------------------------------------------------------------------- images
class ImageSplits(NamedTuple):
    """Training and held-out images, uint8 (N, S, S, 3); labels (N,) int64 (-1: none); factors (N, F) or None."""

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    train_factors: Tensor | None
    test_factors: Tensor | None
    source: str


def _stack(dataset, indices, size: int, desc: str, progress: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(images uint8 (N, size, size, 3), labels (N,), factors (N, F) or None) of dataset items ``indices``."""
    images, labels, factors = [], [], []
    for i in tqdm(indices, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        item = dataset[int(i)]
        image = np.asarray(item["image"])
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{desc}: item {int(i)} is not an RGB image (shape {image.shape})")
        images.append(image)
        labels.append(int(item.get("label", -1)))
        if "factors" in item:
            factors.append(item["factors"])
    x = torch.from_numpy(np.stack(images))
    if x.shape[1:3] != (size, size):
        x = resize(rearrange(x, "n h w c -> n c h w").float() / 255, (size, size))
        x = rearrange((x * 255).round().to(torch.uint8), "n c h w -> n h w c")
    return x, torch.tensor(labels), torch.from_numpy(np.stack(factors)) if factors else None


def _cifar_classes(root: Path) -> int | None:
    """10 or 100 when ``root`` is (or holds) an extracted CIFAR python folder, else None."""
    for classes, folder in ((10, "cifar-10-batches-py"), (100, "cifar-100-python")):
        if root.name == folder or (root / folder).is_dir():
            return classes
    return None


def load_images(cfg: SSLConfig) -> ImageSplits:
    """The run's training and held-out images (see the module docstring for the sources)."""
    size, e, progress = cfg.model.image_size, cfg.eval, cfg.progress and ddp.rank() == 0
    if cfg.data is None:
        train, test = (ProceduralShapes(n, size, seed) for n, seed in ((cfg.images, cfg.seed),
                                                                        (e.test_images, cfg.seed + 1_000_003)))
        parts = [_stack(data, range(len(data)), size, f"render {name}", progress)
                 for data, name in ((train, "training images"), (test, "held-out images"))]
        return ImageSplits(parts[0][0], parts[0][1], parts[1][0], parts[1][1], parts[0][2], parts[1][2], "procedural")
    root = Path(cfg.data)
    if not root.exists():
        raise FileNotFoundError(f"image data {str(root)!r} does not exist (nothing is downloaded)")
    classes = _cifar_classes(root)
    if classes is not None:
        train, test = CIFAR(root, classes, train=True), CIFAR(root, classes, train=False)
        train_idx, test_idx = np.arange(min(len(train), cfg.images)), np.arange(min(len(test), e.test_images))
        source = f"CIFAR-{classes}"
    else:  # one folder: a seeded 80 / 20 split
        train = test = ImageFolder(root, image_size=size)
        order = np.random.default_rng(cfg.seed).permutation(len(train))
        n_test = min(e.test_images, max(1, len(order) // 5))
        if len(order) < 2:
            raise ValueError(f"image folder {str(root)!r} has {len(order)} image; SSL needs at least 2")
        train_idx, test_idx = order[n_test:][: cfg.images], order[:n_test]
        source = f"image folder ({len(train.classes)} classes)" if train.classes else "image folder (no classes)"
    a, b = (_stack(data, idx, size, f"read {name}", progress)
            for data, idx, name in ((train, train_idx, "training images"), (test, test_idx, "held-out images")))
    return ImageSplits(a[0], a[1], b[0], b[1], None, None, source)


def view_batch(images: Tensor, augment: SSLAugment, seed: int, step: int, batch_size: int, rank: int = 0,
               world: int = 1) -> dict[str, Tensor]:
    """The two-view batch of ``step``: ``batch_size`` images drawn (with replacement) and augmented twice
    from a generator seeded by (seed, step) on the images' device; this rank's contiguous slice of it.
    Returns {"obs": float frames (B / world, 2, S, S, 3) in [-0.5, 0.5]} (WorldModel's frame convention)."""
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of ranks ({world})")
    generator = torch.Generator(images.device).manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    index = torch.randint(len(images), (batch_size,), generator=generator, device=images.device)
    x = rearrange(images[index], "b h w c -> b c h w").float() / 255
    views = augment(torch.cat([x, x]), generator)  # (2B, 3, S, S): every view its own draws
    frames = rearrange(views, "(v b) c h w -> b v h w c", v=2) - 0.5
    lo, hi = rank * batch_size // world, (rank + 1) * batch_size // world
    return {"obs": frames[lo:hi].contiguous()}


def _batches(images: Tensor, augment: SSLAugment, cfg: SSLConfig, steps: range) -> Iterator[dict[str, Tensor]]:
    for step in steps:
        yield view_batch(images, augment, cfg.seed, step, cfg.batch_size, ddp.rank(), ddp.world())


# ---------------------------------------------------------------------------------------- the run
def train_ssl(cfg: SSLConfig, final_eval: bool = True) -> Path:
    """Train (or resume) the image-SSL run ``cfg``, then evaluate the backbone features against an untrained
    encoder on rank 0 (``worldmodel.training.ssl_eval``). Returns the run directory. Errors as ``train``."""
    from worldmodel.training.ssl_eval import evaluate_ssl

    cfg = cfg.resolved()
    device = ddp.select_device(cfg.device)
    ddp.init(device)
    rank = ddp.rank()
    start, ckpt = prepare_run(cfg) if rank == 0 else (0, None)
    start, ckpt = ddp.broadcast_object((start, ckpt))
    data = load_images(cfg)
    images = data.train.to(device)
    augment = SSLAugment(cfg.model.image_size, **cfg.augment)
    world = ddp.world()  # validation: one fixed two-view batch of held-out images (step 0's draws)
    val_batch = view_batch(data.test.to(device), augment, cfg.seed, 0, max(world, min(cfg.batch_size, 256) // world *
                                                                        world), rank, world)

    model = build_model(cfg, device)
    optimizer = make_optimizer(model, cfg)
    if ckpt is not None:
        restore(ckpt, model, optimizer, cfg)
    else:
        seed_all(cfg.seed + rank)
    if rank == 0:
        start_files(cfg, ckpt)
    stop_at = cfg.steps if cfg.max_steps is None else min(cfg.steps, cfg.max_steps)
    steps = range(start + 1, stop_at + 1)
    step = run_steps(model, optimizer, cfg, _batches(images, augment, cfg, steps), steps, val_batch, device)
    if step > start or ckpt is None:
        save_checkpoint(model, optimizer, cfg, step)
    ddp.barrier()
    ddp.shutdown()
    if step < cfg.steps:
        ddp.log(f"stopped at step {step} of {cfg.steps} (--max-steps); continue with --resume")
    elif rank == 0 and final_eval:
        evaluate_ssl(model.eval(), cfg, data, step)
        ddp.log(f"wrote {str(cfg.run_dir)!r}")
    return cfg.run_dir

