"""Frames for importers: video decoding (PyAV, else imageio), frame-rate subsampling, square resizing.

Every frame is center-cropped to a square and resized to ``image_size`` x ``image_size`` RGB uint8.
PyAV (``pip install av``, the ``video`` extra) decodes mp4/webm/avi/mkv/mov/gif and resizes in
FFmpeg's swscale (area filter) only the frames kept by the frame-rate subsampling; without PyAV,
imageio (``pip install imageio``) reads what its installed plugins read (gif through Pillow).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".avi", ".mkv", ".mov", ".m4v")
_MISSING = ("reading videos needs PyAV or imageio: pip install 'ldm-worldmodel[video]' (or pip install av)")


def video_backend() -> str:
    """'av' when PyAV is installed, else 'imageio'; ImportError naming the extra when neither is."""
    for name in ("av", "imageio"):
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    raise ImportError(_MISSING)


def keep_for_fps(times: np.ndarray, fps: float | None) -> np.ndarray:
    """Bool mask of the frames kept when subsampling frames at ``times`` (seconds, ascending) to ``fps``:
    the first frame of every 1/fps slot after the first frame. None (or a rate above the source's): all."""
    times = np.asarray(times, np.float64)
    if fps is None or len(times) == 0:
        return np.ones(len(times), bool)
    slots = np.floor((times - times[0]) * fps + 1e-6)
    return np.concatenate([[True], np.diff(slots) > 0])


def _resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) scaled so that the short side is ``size`` (the long one is cropped afterwards)."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def _center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Central size x size of (..., h, w, c) frames."""
    h, w = frames.shape[-3:-1]
    top, left = (h - size) // 2, (w - size) // 2
    return frames[..., top:top + size, left:left + size, :]


def as_frames(obs) -> np.ndarray:
    """Frames (t, h, w, c) uint8 from (t, h, w), (t, h, w, c) or channel-first (t, c, h, w) with c in
    {1, 3, 4}; floats in [0, 1] are scaled to 0..255 (other floats are clipped to 0..255)."""
    obs = np.asarray(obs)
    if obs.ndim == 3:
        obs = obs[..., None]
    if obs.ndim != 4:
        raise ValueError(f"frames must have shape (t, h, w[, c]), got {obs.shape}")
    if obs.shape[-1] not in (1, 3, 4) and obs.shape[1] in (1, 3, 4):
        obs = np.moveaxis(obs, 1, -1)
    if obs.dtype == np.uint8:
        return obs
    if obs.dtype.kind == "f":
        if not np.all(np.isfinite(obs)):
            raise ValueError("frames contain NaN or inf")
        scale = 255.0 if obs.size and obs.max() <= 1.0 else 1.0
        return np.clip(np.rint(obs * scale), 0, 255).astype(np.uint8)
    if obs.dtype.kind in "iub":
        return np.clip(obs, 0, 255).astype(np.uint8)
    raise ValueError(f"frames must be numeric, got dtype {obs.dtype}")


def resize_frames(frames: np.ndarray, size: int | None, batch: int = 256) -> np.ndarray:
    """Center-crop (t, h, w, c) uint8 frames to a square and resize to size x size (antialiased
    bilinear); None, or frames already of that size: unchanged."""
    h, w = frames.shape[1:3]
    if size is None or (h == w == size):
        return frames
    import torch
    import torch.nn.functional as F

    side = min(h, w)
    frames = _center_crop(frames, side)
    out = np.empty((len(frames), size, size, frames.shape[-1]), np.uint8)
    for i in range(0, len(frames), batch):
        x = torch.from_numpy(np.ascontiguousarray(frames[i:i + batch])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)
        out[i:i + batch] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _times(pts: list, time_base, rate) -> np.ndarray:
    if any(p is None for p in pts) or time_base is None:
        return np.arange(len(pts)) / float(rate or 1)
    return np.array(pts, np.float64) * float(time_base)


def count_frames(path: str | Path, fps: float | None = None) -> int:
    """Frames of the video at ``path`` after subsampling to ``fps``, from its packets (no decoding)."""
    if video_backend() == "imageio":
        return len(read_video(path, None, fps))
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = sorted((p.pts for p in container.demux(stream) if p.size), key=lambda p: -1 if p is None else p)
        times = _times(pts, stream.time_base, stream.average_rate)
    return int(keep_for_fps(times, fps).sum())


def read_video(path: str | Path, image_size: int | None = 64, fps: float | None = None) -> np.ndarray:
    """All frames (t, S, S, 3) uint8 of the first video stream of ``path``: subsampled to ``fps``,
    center-cropped to a square and resized to S = ``image_size`` (None: the cropped size).
    ValueError when the file cannot be decoded or holds no frames."""
    if video_backend() == "imageio":
        return _read_imageio(path, image_size, fps)
    import av
    import av.video.reformatter

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames, last_slot, t0 = [], None, None
            reformatter = av.video.reformatter.VideoReformatter()  # keeps its swscale context between frames
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else len(frames) / float(stream.average_rate or 1)
                if fps is not None:
                    t0 = t if t0 is None else t0
                    slot = math.floor((t - t0) * fps + 1e-6)
                    if slot == last_slot:
                        continue
                    last_slot = slot
                side = min(frame.width, frame.height)
                w, h = _resized_shape(frame.width, frame.height, image_size or side)
                rgb = reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
                frames.append(_center_crop(rgb, image_size or side))
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise ValueError(f"cannot decode video: {err}") from err
    if not frames:
        raise ValueError("the video holds no frames")
    return np.stack(frames)


def _read_imageio(path, image_size, fps) -> np.ndarray:
    import imageio.v3 as iio

    try:
        frames = as_frames(iio.imread(str(path), index=None))
        meta = iio.immeta(str(path))
    except Exception as err:  # imageio raises many types (and a plugin may be missing for the format)
        raise ValueError(f"cannot decode video with imageio ({err}); {_MISSING}") from err
    if frames.shape[-1] == 4:
        frames = frames[..., :3]
    elif frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, -1)
    rate = meta.get("fps") or (1000.0 / meta["duration"] if meta.get("duration") else 1.0)
    frames = frames[keep_for_fps(np.arange(len(frames)) / rate, fps)]
    if not len(frames):
        raise ValueError("the video holds no frames")
    return resize_frames(frames, image_size or min(frames.shape[1:3]))
