"""ddkit: diffusion-based dataset distillation under a hard time budget.

Library API (the CLI is a thin layer over it): :mod:`ddkit.config`, :mod:`ddkit.data`, :mod:`ddkit.models`,
:mod:`ddkit.train`, :mod:`ddkit.sampling`, :mod:`ddkit.budget`, :mod:`ddkit.generate`,
:mod:`ddkit.evaluate`, :mod:`ddkit.package`, :mod:`ddkit.cluster`, :mod:`ddkit.container`,
:mod:`ddkit.pipeline`.
"""

__version__ = "0.1.0"
