"""Image datasets for SSL: a procedural set with known generative factors, CIFAR-10/100 and image
folders read from disk (nothing is downloaded), and a two-view wrapper with augmentations.

Every dataset returns dicts with ``image`` uint8 (H, W, 3) numpy and ``label`` int; the procedural
set adds ``factors`` float32 (6,). ``TwoViewDataset`` returns ``obs`` uint8 (2, H, W, 3): the two
views as a length-2 "sequence", in the same layout as ``SequenceWindows`` items.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..envs.wrappers import resize_frame
from .augment import SSLAugment

SHAPES = ("circle", "square", "triangle")
FACTOR_NAMES = ("shape", "x", "y", "scale", "hue", "rotation")


def hsv_to_rgb(hue: float, saturation: float = 1.0, value: float = 1.0) -> np.ndarray:
    """RGB in [0, 1] of an HSV colour (hue in turns)."""
    k = (np.array([5.0, 3.0, 1.0]) + 6 * hue) % 6
    return value - value * saturation * np.clip(np.minimum(k, 4 - k), 0, 1)


class ProceduralShapes(Dataset):
    """Anti-aliased coloured shapes on black, generated on the fly from (seed, index) - no download.

    Factors (``factors`` float32, in ``FACTOR_NAMES`` order), drawn independently and uniformly:
        shape     index into SHAPES (circle, square, triangle) - also the ``label``
        x, y      centre in [0.3, 0.7] (fraction of the image width / height, y downwards)
        scale     circumradius in [0.1, 0.25] of the image size
        hue       in [0, 1) turns (full saturation and value)
        rotation  in [0, 2 pi / k) for a k-gon, i.e. the shape's full range of distinct poses
                  (circles: drawn but invisible, and not identifiable)
    """

    def __init__(self, n: int = 10_000, image_size: int = 32, seed: int = 0):
        if n < 1 or image_size < 8:
            raise ValueError(f"need n >= 1 and image_size >= 8, got n={n}, image_size={image_size}")
        self.n, self.image_size, self.seed = int(n), int(image_size), int(seed)
        grid = (np.arange(self.image_size) + 0.5) / self.image_size
        self._x, self._y = np.meshgrid(grid, grid)

    def __len__(self) -> int:
        return self.n

    def factors(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(index)])
        shape = int(rng.integers(len(SHAPES)))
        sides = {0: 1, 1: 4, 2: 3}[shape]
        x, y = rng.uniform(0.3, 0.7, 2)
        return np.array([shape, x, y, rng.uniform(0.1, 0.25), rng.uniform(), rng.uniform(0, 2 * np.pi / sides)], np.float32)

    def render(self, factors: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) image of the given factor vector."""
        shape, cx, cy, radius, hue, rotation = (float(f) for f in factors)
        dx, dy = self._x - cx, self._y - cy
        if SHAPES[int(shape)] == "circle":
            distance = np.hypot(dx, dy) - radius
        else:  # regular k-gon: max over edge normals of the signed distance to each edge's line
            k = 4 if SHAPES[int(shape)] == "square" else 3
            angles = rotation + (2 * np.arange(k) + 1) * np.pi / k
            normals = np.stack([np.cos(angles), np.sin(angles)])
            distance = (dx[..., None] * normals[0] + dy[..., None] * normals[1]).max(-1) - radius * np.cos(np.pi / k)
        coverage = np.clip(0.5 - distance * self.image_size, 0.0, 1.0)
        return np.round(coverage[..., None] * hsv_to_rgb(hue) * 255).astype(np.uint8)

    def __getitem__(self, index: int) -> dict:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        factors = self.factors(index % self.n)
        return {"image": self.render(factors), "label": int(factors[0]), "factors": factors}


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # the official CIFAR python format (trusted local files only)


class CIFAR(Dataset):
    """CIFAR-10 or CIFAR-100 from the official "python version" pickle batches already on disk.

    ``root`` is the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its parent.
    CIFAR-100 labels are the fine (100-way) ones unless ``coarse=True`` (20 superclasses).
    Nothing is downloaded: missing files raise FileNotFoundError naming what was expected.
    Only open files you trust: the format is Python pickle.
    """

    _LAYOUT = {
        10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
        100: ("cifar-100-python", ["train"], ["test"]),
    }

    def __init__(self, root: str | os.PathLike, num_classes: int = 10, train: bool = True, coarse: bool = False):
        if num_classes not in self._LAYOUT:
            raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
        folder, train_files, test_files = self._LAYOUT[num_classes]
        root = Path(root)
        base = root if root.name == folder else root / folder
        files = [base / name for name in (train_files if train else test_files)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"CIFAR-{num_classes} files not found: {missing}. Download and extract the official python "
                f"version (folder {folder!r}) yourself and pass its location as root; nothing is downloaded."
            )
        key = b"labels" if num_classes == 10 else (b"coarse_labels" if coarse else b"fine_labels")
        images, labels = [], []
        for path in files:
            batch = _load_pickle(path)
            if b"data" not in batch or key not in batch:
                raise ValueError(f"{str(path)!r} is not a CIFAR-{num_classes} batch (needs keys b'data' and {key!r})")
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[key], np.int64))
        self.images, self.labels = np.concatenate(images), np.concatenate(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}


class ImageFolder(Dataset):
    """ImageNet-style folder ``root/<class>/<image>`` (png, jpg, jpeg, bmp, gif, webp), read with Pillow.

    Labels index the sorted class folder names (``classes``); a folder holding images and no class folders
    gives unlabelled images (label -1, ``classes`` empty). Grayscale and RGBA images are converted to RGB. With ``image_size`` every image is
    centre-cropped to a square and area-resized to image_size x image_size (needed for batching).
    """

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

    def __init__(self, root: str | os.PathLike, image_size: int | None = None):
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise ImportError("ImageFolder reads image files with Pillow: pip install pillow") from None
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in self.EXTENSIONS
        ]
        if not self.samples:  # a folder of images without class folders: unlabelled (label -1)
            self.classes = []
            self.samples = [(path, -1) for path in sorted(root.iterdir()) if path.suffix.lower() in self.EXTENSIONS]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(self.EXTENSIONS)}) in {str(root)!r} or its class folders")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        import PIL.Image

        path, label = self.samples[index]
        with PIL.Image.open(path) as img:
            image = np.asarray(img.convert("RGB"))
        if self.image_size:
            h, w, _ = image.shape
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            image = resize_frame(image[top : top + side, left : left + side], (self.image_size, self.image_size))
        return {"image": image, "label": label}


class TwoViewDataset(Dataset):
    """Two independently augmented views of each image of ``base`` (a dataset of dicts with ``image``).

    Item: ``obs`` uint8 (2, S, S, 3) (a length-2 sequence, as ``SequenceWindows`` items), ``label``
    int64, and ``factors`` float32 when the base provides them. ``augment`` defaults to
    ``SSLAugment(size)``. Random draws use torch's global generator (seeded per DataLoader worker).
    """

    def __init__(self, base: Dataset, size: int = 32, augment=None):
        self.base, self.augment = base, augment or SSLAugment(size)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        image = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float() / 255.0
        views = self.augment(image.expand(2, -1, -1, -1))  # (2, 3, S, S), independent draws
        out = {
            "obs": (views * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(),
            "label": torch.tensor(item.get("label", -1), dtype=torch.int64),
        }
        if "factors" in item:
            out["factors"] = torch.as_tensor(item["factors"], dtype=torch.float32)
        return out
