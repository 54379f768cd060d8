"""Rollout store, sequence windows, two-view image datasets and rollout collection."""

from .collect import OUPolicy, RandomPolicy, action_dim, action_vector, collect, episode_seeds, ou_policy, random_policy
from .store import FORMAT_VERSION, RolloutStore
from .windows import SequenceWindows

__all__ = [
    "FORMAT_VERSION",
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
