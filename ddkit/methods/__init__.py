"""Distillation methods built on the diffusion backbone: :mod:`ddkit.methods.minimax` (Minimax Diffusion
fine-tuning losses and memories) and :mod:`ddkit.methods.d3hr` (D^3HR initial latents)."""
