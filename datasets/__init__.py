"""Rollout store, sequence windows, two-view image datasets and rollout collection."""
