"""ldm-worldmodel: latent world models by latent distribution matching (LDM).

The flow, in the package's folders: frames -> `encoders` -> latents z -> `objective` (LatentNorm, then
the alignment of a prior from `priors` plus an entropy estimate, `methods` naming the presets) ->
with a state-space prior, exact filtering and k-step prediction (`kalman`) -> `model.WorldModel`, which
`training` trains and evaluates from `train.py`. Data come from `worldmodel.envs` and
`worldmodel.datasets`.
"""

__version__ = "0.2.0"
