"""The generation-method registry: name -> the class that implements :class:`ddkit.methods.base.GenerationMethod`.

Registration is one line per method below, the way diffusers lists its schedulers: the module is imported only
when the method is built, so validating a config (``generate.method``, ``methods``) stays torch-free and
``ddkit --help`` stays fast. ``<base>+select`` is any registered base wrapped by
:class:`ddkit.methods.selected.Selected`.

This module imports nothing from ddkit at module level but :mod:`ddkit.errors`, so every other module may
import it.
"""

from __future__ import annotations

import importlib
from typing import Any

from ddkit.errors import ConfigError

SELECT = "+select"

#: name -> ("module:Class", the config sections under ``generate`` it reads). The one place a method is
#: registered; only that method's fingerprint reads its sections. A composition reads its parts' sections.
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "minimax": ("ddkit.methods.dit:Minimax", ()),
    "dit": ("ddkit.methods.dit:PlainDiT", ()),
    "d3hr": ("ddkit.methods.d3hr.method:D3HR", ("d3hr",)),
    "mgd3": ("ddkit.methods.mgd3:MGD3", ("modes",)),
    "igd": ("ddkit.methods.igd.method:IGD", ("igd",)),
    "igd+mgd3": ("ddkit.methods.igd_mgd3:IGDOnModes", ("igd", "modes")),
}
SELECT_SECTION = "select"  # generate.select: the +select wrapper's section
#: Pseudo-methods: a name resolved to a registered method per experiment (:func:`resolve`).
PSEUDO: dict[str, str] = {"best": "ddkit.methods.best:resolve"}


def split(name: str) -> tuple[str, bool]:
    """``"dit+select"`` -> ``("dit", True)``; ``"dit"`` -> ``("dit", False)``."""
    if name.endswith(SELECT):
        return name[: -len(SELECT)], True
    return name, False


def names(with_select: bool = True) -> tuple[str, ...]:
    """Every method name: the registered bases, then (``with_select``) each ``<base>+select``."""
    bases = tuple(METHODS)
    return bases + (tuple(b + SELECT for b in bases) if with_select else ())


def check(name: str, key: str = "generate.method") -> str:
    """``name`` if it is a registered method or ``<base>+select``.

    Raises:
        ConfigError: one line naming ``key``, the value and the known names.
    """
    base, _ = split(name)
    if base not in METHODS and name not in PSEUDO:
        raise ConfigError(f"{key}: unknown method {name!r} (known: {', '.join(METHODS)}, each also as "
                          f"<base>{SELECT}, and {', '.join(PSEUDO)})")
    return name


def resolve(name: str, cfg: Any) -> tuple[str, str, str]:
    """(registered method, ``generate.quality`` to plan with, a note for the plan's reason) for ``name`` in
    the :class:`ddkit.config.ExperimentConfig` ``cfg``: a pseudo-method (``best``, :mod:`ddkit.methods.best`)
    is resolved; any other name is itself, with the configured table and no note.

    Raises:
        ConfigError: an unknown name, or a pseudo-method that cannot be resolved (one line).
    """
    check(name)
    if name not in PSEUDO:
        return name, cfg.generate.quality, ""
    module, fn = PSEUDO[name].split(":")
    method, quality, note = getattr(importlib.import_module(module), fn)(cfg)
    return check(method, f"generate.method ({name})"), quality, note


def sections_read(name: str) -> tuple[str, ...]:
    """The method-owned ``generate.<section>`` keys that ``name`` reads (its own and, with ``+select``,
    ``generate.select``)."""
    if name in PSEUDO:  # resolved per experiment: any method's section may be read
        return _every_section()
    base, selected = split(name)
    own = METHODS[base][1] if base in METHODS else ()
    return tuple(f"generate.{s}" for s in own) + ((f"generate.{SELECT_SECTION}",) if selected else ())


def _every_section() -> tuple[str, ...]:
    own = dict.fromkeys(s for _, sections in METHODS.values() for s in sections)
    return tuple(f"generate.{s}" for s in own) + (f"generate.{SELECT_SECTION}",)


def sections_ignored(name: str) -> tuple[str, ...]:
    """The method-owned ``generate.<section>`` keys that ``name`` does not read."""
    return tuple(k for k in _every_section() if k not in sections_read(name))


def build(name: str, cfg: Any) -> Any:
    """The :class:`ddkit.methods.base.GenerationMethod` ``name`` (``<base>[+select]``) for the
    :class:`ddkit.config.ExperimentConfig` ``cfg``.

    Raises:
        ConfigError: an unknown name (one line).
    """
    name = resolve(name, cfg)[0]
    base, selected = split(name)
    module, cls = METHODS[base][0].split(":")
    method = getattr(importlib.import_module(module), cls)(cfg)
    if selected:
        sel = importlib.import_module("ddkit.methods.selected").Selected
        method = sel(method, cfg)
    return method


def label(name: str) -> str:
    """The results-table label of method ``name`` (its class's ``label``; ``+select`` adds the selection).

    Raises:
        ConfigError: an unknown name.
    """
    check(name)
    base, selected = split(name)
    module, cls = METHODS[base][0].split(":")
    text = getattr(importlib.import_module(module), cls).label
    return f"{text.removesuffix(' (ours)')} + selection (ours)" if selected else text
