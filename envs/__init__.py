"""Gymnasium environments with pixel observations and the true state in ``info["state"]``."""
