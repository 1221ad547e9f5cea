"""Plain class-conditional DiT sampling, from the pretrained weights (``dit``) or this run's Minimax
Diffusion checkpoint (``minimax``; Gu et al., CVPR 2024: the fine-tuning itself is
:mod:`ddkit.methods.minimax`). Neither changes the sampling step: both are the interface's defaults."""

from __future__ import annotations

from ddkit.methods.base import GenerationMethod


class PlainDiT(GenerationMethod):
    """The pretrained DiT as it is (the baseline every other method is measured against)."""

    name = "dit"
    label = "plain DiT (no minimax)"


class Minimax(GenerationMethod):
    """Samples RUN/minimax: the DiT fine-tuned with representativeness and diversity losses."""

    name = "minimax"
    label = "Minimax DiT (ours)"

    @property
    def weights(self) -> str:
        return "minimax"
