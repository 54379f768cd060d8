"""Image SSL data: procedural shapes with known factors, torch augmentations, CIFAR / folder loaders."""

import colorsys
import math
import pickle
import sys

import numpy as np
import pytest
import torch

from worldmodel.datasets import CIFAR, ImageFolder, ProceduralShapes, SSLAugment, TwoViewDataset
from worldmodel.datasets.augment import adjust_hue, color_jitter, gaussian_blur, grayscale, random_resized_crop


def test_procedural_shapes_render_their_factors():
    data = ProceduralShapes(n=300, image_size=64, seed=0)
    assert np.array_equal(data[5]["image"], ProceduralShapes(n=300, image_size=64, seed=0)[5]["image"])
    factors = np.stack([data[i]["factors"] for i in range(300)])
    assert set(np.unique(factors[:, 0])) == {0.0, 1.0, 2.0}
    assert factors[:, 1:3].min() >= 0.3 and factors[:, 1:3].max() <= 0.7
    for i in range(40):
        item = data[i]
        shape, x, y, r, hue, _ = item["factors"]
        coverage = item["image"].max(-1) / 255.0 / hsv_to_rgb_max(hue)
        area = {0: np.pi * r**2, 1: 2 * r**2, 2: 3 * np.sqrt(3) / 4 * r**2}[int(shape)]
        assert abs(coverage.sum() / 64**2 - area) < 0.03 * area + 2 / 64**2 * r * 64  # edge pixels
        grid = (np.arange(64) + 0.5) / 64
        assert abs((coverage.sum(0) * grid).sum() / coverage.sum() - x) < 0.01
        assert abs((coverage.sum(1) * grid).sum() / coverage.sum() - y) < 0.01
        brightest = item["image"].reshape(-1, 3)[coverage.argmax()] / 255.0
        np.testing.assert_allclose(brightest, colorsys.hsv_to_rgb(hue, 1, 1), atol=1 / 255 + 1e-6)
        assert item["label"] == int(shape)


def hsv_to_rgb_max(hue):
    return max(colorsys.hsv_to_rgb(float(hue), 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hue_rotation_and_grayscale_match_colorsys(dtype):
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=dtype)
    torch.testing.assert_close(adjust_hue(image, 0.0), image, atol=1e-6, rtol=0)
    shifted = adjust_hue(image, 0.3)
    for i, j in ((0, 0), (2, 3), (4, 6)):
        h, s, v = colorsys.rgb_to_hsv(*image[:, i, j].tolist())
        expected = colorsys.hsv_to_rgb((h + 0.3) % 1.0, s, v)
        torch.testing.assert_close(shifted[:, i, j], torch.tensor(expected, dtype=dtype), atol=1e-5, rtol=0)
    gray = grayscale(image)
    torch.testing.assert_close(gray[1], 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])
    assert gray.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blur_crop_and_jitter(dtype):
    impulse = torch.zeros(3, 21, 21, dtype=dtype)
    impulse[:, 10, 10] = 1.0
    blurred = gaussian_blur(impulse, sigma=1.5)
    x = torch.arange(-3, 4, dtype=torch.float64)
    ref = torch.exp(-(x[:, None] ** 2 + x[None] ** 2) / (2 * 1.5**2))
    ref = ref / torch.exp(-(torch.arange(-5, 6.0) ** 2) / (2 * 1.5**2)).sum() ** 2  # kernel radius ceil(3 sigma) = 5
    torch.testing.assert_close(blurred[0, 7:14, 7:14], ref.to(dtype), atol=1e-6, rtol=0)
    assert abs(blurred.sum().item() - 3.0) < 1e-5
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(1), dtype=dtype)
    whole = random_resized_crop(image, (16, 24), scale=(1.0, 1.0), ratio=(1.5, 1.5))  # the full image
    torch.testing.assert_close(whole, image)
    half = random_resized_crop(image, (8, 12), scale=(0.25, 0.25), ratio=(1.5, 1.5), generator=torch.Generator().manual_seed(2))
    windows = image.unfold(1, 8, 1).unfold(2, 12, 1)  # every 8x12 crop: (3, 9, 13, 8, 12)
    assert min((half - windows[:, i, j]).abs().max() for i in range(9) for j in range(13)) < 1e-5
    crop = random_resized_crop(image, (8, 8), generator=torch.Generator().manual_seed(0))
    assert crop.shape == (3, 8, 8) and crop.dtype == dtype
    gen = torch.Generator().manual_seed(3)
    brighter = color_jitter(image * 0.5, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, generator=gen)
    torch.testing.assert_close(brighter, image * 0.5)
    with pytest.raises(ValueError, match="image must be a float tensor"):
        grayscale(torch.zeros(1, 4, 4))


def test_two_view_dataset_with_workers():
    data = TwoViewDataset(ProceduralShapes(n=16, image_size=32), size=24)
    torch.manual_seed(0)
    item = data[0]
    assert item["obs"].shape == (2, 24, 24, 3) and item["obs"].dtype == torch.uint8
    assert not torch.equal(item["obs"][0], item["obs"][1])
    assert item["factors"].shape == (6,) and item["label"].item() == int(item["factors"][0])
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["obs"].shape == (8, 2, 24, 24, 3)
    # with every augmentation off, both views are the resized image
    identity = SSLAugment(32, scale=(1.0, 1.0), jitter_p=0, gray_p=0, blur_p=0, flip_p=0)
    plain = TwoViewDataset(ProceduralShapes(n=4, image_size=32), augment=identity)[1]["obs"]
    np.testing.assert_array_equal(plain[0].numpy(), ProceduralShapes(n=4, image_size=32)[1]["image"])


def write_cifar(root, num_classes, n=3):
    rng = np.random.default_rng(0)
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if num_classes == 10 else ["train", "test"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        if num_classes == 10:
            batch[b"labels"] = list(rng.integers(0, 10, n))
        else:
            batch[b"fine_labels"], batch[b"coarse_labels"] = list(rng.integers(0, 100, n)), list(rng.integers(0, 20, n))
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar_loaders_read_pickle_batches(tmp_path):
    folder = write_cifar(tmp_path / "c10", 10)
    train = CIFAR(tmp_path / "c10", num_classes=10, train=True)
    assert len(train) == 15 and train[0]["image"].shape == (32, 32, 3)
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # row-major R plane, then G, then B: pixel (row 2, col 5) of channel 1 is raw[1024 + 2 * 32 + 5]
    assert train[0]["image"][2, 5, 1] == raw[b"data"][0, 1024 + 2 * 32 + 5]
    assert train[0]["label"] == raw[b"labels"][0]
    assert len(CIFAR(folder, num_classes=10, train=False)) == 3
    write_cifar(tmp_path / "c100", 100)
    fine, coarse = CIFAR(tmp_path / "c100", 100), CIFAR(tmp_path / "c100", 100, coarse=True)
    assert len(fine) == 3 and fine.labels.max() < 100 and coarse.labels.max() < 20
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR(tmp_path / "nothing", num_classes=10)
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        CIFAR(tmp_path / "c10", num_classes=10, train=False)


def test_image_folder(tmp_path, monkeypatch):
    PIL = pytest.importorskip("PIL.Image")
    for label, name in enumerate(("cat", "dog")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for k in range(2):
            pixels = np.full((20, 30, 3), 40 * (2 * label + k), np.uint8)
            PIL.fromarray(pixels).save(tmp_path / "imgs" / name / f"{k}.png")
    data = ImageFolder(tmp_path / "imgs", image_size=8)
    assert data.classes == ["cat", "dog"] and len(data) == 4
    item = data[3]
    assert item["label"] == 1 and item["image"].shape == (8, 8, 3) and item["image"].max() == 120
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty")
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        ImageFolder(tmp_path / "imgs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_augmentations_draw_per_image(dtype):
    """A batch gets one draw per image: each crop is a window of its own image, a flip mirrors it, a per-image
    hue shift and blur equal the single-image operations (blur: against a dense float64 reference)."""
    gen = torch.Generator().manual_seed(0)
    batch = torch.rand(5, 3, 16, 24, generator=gen, dtype=dtype)
    crops = random_resized_crop(batch, (8, 12), scale=(0.25, 0.25), ratio=(1.5, 1.5), generator=gen)
    windows = batch.unfold(2, 8, 1).unfold(3, 12, 1)  # (5, 3, 9, 13, 8, 12)
    offsets = []
    for n in range(5):
        errors = torch.stack([(crops[n] - windows[n, :, i, j]).abs().max() for i in range(9) for j in range(13)])
        assert errors.min() < 1e-5
        offsets.append(int(errors.argmin()))
    assert len(set(offsets)) > 1  # not one box for the whole batch
    flip = torch.tensor([True, False, True, False, False])
    mirrored = random_resized_crop(batch, (16, 24), scale=(1.0, 1.0), ratio=(1.5, 1.5), generator=gen, flip=flip)
    torch.testing.assert_close(mirrored, torch.where(flip[:, None, None, None], batch.flip(-1), batch))
    shifts = torch.tensor([0.0, 0.1, -0.2, 0.3, 0.5], dtype=dtype)
    shifted = adjust_hue(batch, shifts)
    for n in range(5):
        torch.testing.assert_close(shifted[n], adjust_hue(batch[n], float(shifts[n])))
    sigmas = torch.tensor([0.3, 0.8, 1.2, 0.5, 1.0], dtype=dtype)
    blurred = gaussian_blur(batch, sigmas).double()
    radius = 4  # ceil(3 * max sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    for n in range(5):
        kernel = torch.exp(-(x**2) / (2 * float(sigmas[n]) ** 2))
        kernel = (kernel / kernel.sum()).tolist()
        padded = np.pad(batch[n].double().numpy(), ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
        dense = sum(kernel[i] * kernel[j] * padded[:, i:i + 16, j:j + 24] for i in range(9) for j in range(9))
        np.testing.assert_allclose(blurred[n].numpy(), dense, atol=1e-6)
    jittered = color_jitter(batch, generator=gen)
    assert jittered.shape == batch.shape and jittered.dtype == dtype and 0 <= jittered.min() <= jittered.max() <= 1
    views = SSLAugment(12)(batch, gen)
    assert views.shape == (5, 3, 12, 12) and views.dtype == dtype
    assert not torch.equal(views[0], SSLAugment(12)(batch, torch.Generator().manual_seed(1))[0])


def test_rotated_crops_turn_the_image_about_the_box_centre():
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    quarter = random_resized_crop(image, (8, 8), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                  angle=torch.tensor([math.pi / 2, math.pi], dtype=torch.float64))
    torch.testing.assert_close(quarter[0], torch.rot90(image[0], -1, (1, 2)))
    torch.testing.assert_close(quarter[1], image[1].flip(-1).flip(-2))
    views = SSLAugment(8, scale=(1.0, 1.0), jitter_p=0, gray_p=0, blur_p=0, flip_p=0, rotation=90)(image[0])
    assert views.shape == (3, 8, 8) and not torch.allclose(views, image[0])
