"""ldm-worldmodel: latent world models by latent distribution matching (LDM)."""

__version__ = "0.1.0"
