"""Model files shipped inside the package, named in configs as ``ddkit:NAME``.

``ddkit:mnist-dit-t4`` is the demo's pretrained DiT-T/4 (a diffusers ``save_pretrained`` folder:
``config.json`` + ``diffusion_pytorch_model.safetensors``), made by ``tools/make_demo_checkpoint.py``. It
plays the part ``facebook/DiT-XL-2-256`` plays in the real workflow: the demo fine-tunes, generates and
evaluates from it instead of pretraining on the user's CPU (issue 13: 2,400 steps took 4.7 h under
emulated bf16 on an AVX2-only CPU and ~21 min in fp32).
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "ddkit:"


def asset_path(ref: str) -> str:
    """The local path of ``ref`` when it names a shipped asset (``ddkit:NAME``), else ``ref`` unchanged.

    Raises:
        WeightsError: ``ddkit:NAME`` names no shipped asset (lists the ones there are).
    """
    if not str(ref).startswith(PREFIX):
        return ref
    name = str(ref)[len(PREFIX):]
    here = Path(__file__).resolve().parent
    path = here / name
    if not name or not (path / "config.json").is_file():
        from ddkit.errors import WeightsError

        known = sorted(p.name for p in here.iterdir() if (p / "config.json").is_file())
        raise WeightsError(f"{ref}: no such shipped model (shipped: {', '.join(known) or 'none'})")
    return str(path)
