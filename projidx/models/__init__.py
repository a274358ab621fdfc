"""Models: what featurization differentiates, and where its weights come from.

- :mod:`projidx.models.diffusion`: noise schedules, the diffusion loss, attribution outputs, DDIM sampling;
- :mod:`projidx.models.unet`: the small epsilon-prediction UNet;
- :mod:`projidx.models.checkpoints`: checkpoint sets (projidx directories, diffusers folders);
- :mod:`projidx.models.training`: training a small DDPM, cached.
"""
