"""Influence-Guided Diffusion (Chen et al., ICLR 2025; reference mchen725/DD_IGD) as method ``igd``.

:mod:`~ddkit.methods.igd.influence` holds the formulas, :mod:`~ddkit.methods.igd.guide` the guided DDPM step,
:mod:`~ddkit.methods.igd.surrogate` the surrogate trajectory prepared once, :mod:`~ddkit.methods.igd.method`
the :class:`~ddkit.methods.base.GenerationMethod`. README "IGD" lists the settings and the departures.
"""
