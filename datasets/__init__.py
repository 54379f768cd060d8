"""Rollout store, sequence windows, two-view image datasets and rollout collection."""

from .augment import SSLAugment, color_jitter, gaussian_blur, grayscale, random_resized_crop
from .collect import OUPolicy, RandomPolicy, action_dim, action_vector, collect, episode_seeds, ou_policy, random_policy
from .images import CIFAR, FACTOR_NAMES, SHAPES, ImageFolder, ProceduralShapes, TwoViewDataset
from .store import FORMAT_VERSION, CorruptEpisodeError, RolloutStore
from .windows import SequenceWindows

__all__ = [
    "CIFAR",
    "CorruptEpisodeError",
    "FACTOR_NAMES",
    "FORMAT_VERSION",
    "ImageFolder",
    "ProceduralShapes",
    "SHAPES",
    "SSLAugment",
    "TwoViewDataset",
    "color_jitter",
    "gaussian_blur",
    "grayscale",
    "random_resized_crop",
    "OUPolicy",
    "RandomPolicy",
    "RolloutStore",
    "SequenceWindows",
    "action_dim",
    "action_vector",
    "collect",
    "episode_seeds",
    "ou_policy",
    "random_policy",
]
