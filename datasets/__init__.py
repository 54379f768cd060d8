"""Rollout store, sequence windows, two-view image datasets, rollout collection and importers of outside data."""

from .augment import SSLAugment, color_jitter, gaussian_blur, grayscale, random_resized_crop
from .collect import OUPolicy, RandomPolicy, StateFeedbackPolicy, action_dim, action_vector, collect, episode_seeds, ou_policy, random_policy
from .importers import (ImportConfig, SourceSkippedWarning, import_arrays, import_lerobot, import_minari,
                        import_videos, run_import)
from .images import CIFAR, FACTOR_NAMES, SHAPES, ImageFolder, ProceduralShapes, TwoViewDataset
from .store import FORMAT_VERSION, CorruptEpisodeError, RolloutStore
from .windows import SequenceWindows

__all__ = [
    "CIFAR",
    "CorruptEpisodeError",
    "FACTOR_NAMES",
    "FORMAT_VERSION",
    "ImageFolder",
    "ImportConfig",
    "ProceduralShapes",
    "SHAPES",
    "SSLAugment",
    "SourceSkippedWarning",
    "TwoViewDataset",
    "color_jitter",
    "gaussian_blur",
    "import_arrays",
    "import_lerobot",
    "import_minari",
    "import_videos",
    "run_import",
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
    "StateFeedbackPolicy",
    "random_policy",
]
