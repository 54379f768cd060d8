"""Import speed of worldmodel.datasets.import_videos: frames per second over N generated short videos.

    python bench/import_speed.py [--videos 100] [--frames 50] [--size 128] [--image-size 64] [--fps none]

Writes N mp4 clips (mpeg4, a moving square on a noisy background, size x size pixels) to a temp folder,
imports them into a fresh store, and prints decode+resize+write throughput (the target: >= 2,000 frames/s
on 2 CPU cores at the defaults). Needs PyAV (pip install av).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def write_clip(path: Path, frames: int, size: int, rng: np.random.Generator) -> None:
    import av

    background = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=20)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            frame = background.copy()
            x = (t * 3) % (size - 16)
            frame[size // 3:size // 3 + 16, x:x + 16] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--frames", type=int, default=50, help="frames per clip")
    parser.add_argument("--size", type=int, default=128, help="source frame size")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--fps", type=float, default=None)
    args = parser.parse_args()

    from worldmodel.datasets import import_videos

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clips"
        folder.mkdir()
        for i in range(args.videos):
            write_clip(folder / f"clip{i:04d}.mp4", args.frames, args.size, rng)
        start = time.perf_counter()
        store = import_videos(folder, Path(tmp) / "out.zarr", image_size=args.image_size, fps=args.fps,
                              progress=False)
        elapsed = time.perf_counter() - start
        frames = int(store.lengths().sum())
    print(f"imported {len(store)} videos, {frames} frames ({args.size}x{args.size} -> {args.image_size}x"
          f"{args.image_size}) in {elapsed:.2f} s: {frames / elapsed:,.0f} frames/s")


if __name__ == "__main__":
    main()
