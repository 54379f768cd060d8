"""Latent models P_theta for the LDM objective: plane, sphere, kalman, predictor, factorized."""

from worldmodel.kalman_model import KalmanLatentModel

__all__ = ["KalmanLatentModel"]
