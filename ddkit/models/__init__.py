"""Diffusion backbones: registry, diffusers DiT wrapper with DiffFit gammas, VAE and checkpoint helpers.

Public API: :data:`REGISTRY`, :func:`build_backbone`, :func:`load_backbone`, :class:`Backbone`,
:mod:`ddkit.models.vae` (``load_vae``/``encode``/``decode``), :mod:`ddkit.models.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from ddkit.assets import asset_path
from ddkit.config import ModelConfig, from_dict
from ddkit.errors import WeightsError
from ddkit.models.backbone import (
    REGISTRY,
    ArchSpec,
    Backbone,
    DiffFitGammas,
    arch_name,
    arch_spec,
    build_backbone,
    check_model_config,
    config_from_diffusers,
    init_dit_weights,
    make_dit,
    tie_conditioning,
)
from ddkit.models.checkpoint import (
    as_checkpoint,
    checkpoint_path,
    load_checkpoint,
    read_torch_file,
    resolve_checkpoint,
    save_checkpoint,
)
from ddkit.models.dit_original import load_original, original_state
from ddkit.models.provenance import check_record, folder_record
from ddkit.models.sources import load_first

__all__ = [
    "REGISTRY",
    "ArchSpec",
    "Backbone",
    "DiffFitGammas",
    "arch_name",
    "arch_spec",
    "build_backbone",
    "check_model_config",
    "checkpoint_path",
    "config_from_diffusers",
    "init_dit_weights",
    "load_backbone",
    "load_checkpoint",
    "model_config_from_dict",
    "resolve_checkpoint",
    "save_checkpoint",
    "tie_conditioning",
]


def model_config_from_dict(d: dict, source: str = "<checkpoint>"):
    """A :class:`ddkit.config.ModelConfig` from its dict form (as stored in checkpoints)."""

    return from_dict(ModelConfig, d, source)


def load_backbone(
    path: str | Path,
    *,
    use_ema: bool = True,
    device="cpu",
    difffit_blocks: int | None = None,
    timestep_shift: int | None = None,
    expect=None,
):
    """Load a backbone from a ddkit checkpoint, a stage dir, or a diffusers DiT dir / Hugging Face id.

    Args:
        path: ``RUN/<stage>/ckpt/last.pt``, ``RUN/<stage>``, a shipped ``ddkit:NAME`` (:mod:`ddkit.assets`), an original-DiT ``.pt`` (facebookresearch/DiT or
            MinimaxDiffusion, ported by :mod:`ddkit.models.dit_original`), a diffusers
            ``DiTTransformer2DModel`` dir (or a pipeline dir with ``transformer/``), or an HF id such as
            ``facebook/DiT-XL-2-256`` present in the local HF cache (loaded with ``local_files_only=True``;
            no network).
        use_ema: take the EMA weights of a ddkit checkpoint (what sampling uses).
        device: where to put the model.
        difffit_blocks: add DiffFit gammas (init 1) to the first N blocks when the source has fewer
            (fine-tuning start); None keeps the source's.
        timestep_shift: ``ModelConfig.timestep_shift`` override (None: the source's own; 0 for original DiT).
        expect: the run's ``ModelConfig``; a diffusers DiT must match its ``arch``, ``in_channels``,
            ``input_size``, ``num_classes`` and ``learn_sigma`` (any size loads: unknown sizes are named
            ``custom(...)``), and its other keys (VAE, latent scale, timesteps) are kept.

    Returns:
        (Backbone in eval mode, ModelConfig). The Backbone's ``made_on`` is the record of the data the
        weights were made on (:mod:`ddkit.models.provenance`: a ddkit checkpoint's ``made_on``, a diffusers
        folder's ``ddkit.json``), None when the source has none; check it with
        :func:`ddkit.models.provenance.check_classes` before using the weights on a dataset.

    Raises:
        WeightsError: nothing loadable at ``path``: one line that names it, says whether the weights are
        missing or present but unreadable, and lists each place tried with its error
        (:func:`ddkit.models.sources.load_first`); a malformed ``made_on`` record. ConfigError: unknown
        architecture, or a diffusers DiT that differs from ``expect`` (lists what the folder holds).
    """

    path = asset_path(str(path))
    ckpt = resolve_checkpoint(path)
    if ckpt is not None:
        model, mcfg, made_on = _from_checkpoint_file(ckpt, use_ema, difffit_blocks, timestep_shift)
    else:
        model, mcfg, made_on = _from_diffusers(str(path), expect)
        if difffit_blocks:
            mcfg = dataclasses.replace(mcfg, difffit_blocks=difffit_blocks)
        if timestep_shift is not None:
            mcfg = dataclasses.replace(mcfg, timestep_shift=timestep_shift)
        model = Backbone(model, mcfg)
    model.made_on = made_on
    return model.to(device).eval(), mcfg


def _from_checkpoint_file(ckpt: Path, use_ema: bool, difffit_blocks: int | None, timestep_shift: int | None):
    """(Backbone, ModelConfig, ``made_on`` record or None) of a ``.pt`` file: an original-DiT checkpoint or a
    ddkit one (see :func:`load_backbone` for the arguments)."""

    blob = read_torch_file(ckpt)  # read once: DiT-XL/2 checkpoints are gigabytes
    orig = original_state(blob)
    if orig is not None:
        model, mcfg = load_original(
            orig, source=str(ckpt), timestep_shift=timestep_shift, difffit_blocks=difffit_blocks
        )
        return model, mcfg, None
    state = as_checkpoint(blob, ckpt)
    made_on = state.get("made_on")  # None: written before ddkit kept records
    if made_on is not None:
        check_record(made_on, str(ckpt))
    mcfg = model_config_from_dict(state["model_config"], str(ckpt))
    if timestep_shift is not None:
        mcfg = dataclasses.replace(mcfg, timestep_shift=timestep_shift)
    src_blocks = mcfg.difffit_blocks
    if difffit_blocks is not None and difffit_blocks > src_blocks:
        mcfg = dataclasses.replace(mcfg, difffit_blocks=difffit_blocks)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    if _embedder_copies_equal(weights):
        model = build_backbone(mcfg, init=False)
    else:  # fine-tuned from an untied source: tying would keep only one block's copy

        model = Backbone(make_dit(mcfg, init=False), mcfg, tie_embedders=False)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    bad = [k for k in missing if not k.startswith("gammas.")] + list(unexpected)
    if bad:
        raise WeightsError(f"{ckpt}: weights do not match model {mcfg.arch} ({bad[0]} ...)")
    return model, mcfg, made_on


def _from_diffusers(src: str, expect):
    """(diffusers ``DiTTransformer2DModel``, ModelConfig, ``made_on`` record or None) of a diffusers folder
    (or pipeline folder with ``transformer/``) or a Hugging Face id in the local cache (see
    :func:`load_backbone`)."""
    from diffusers import DiTTransformer2DModel

    p = Path(src)
    if p.is_dir():
        if (p / "config.json").is_file():
            subs = [""]
        elif (p / "transformer" / "config.json").is_file():
            subs = ["transformer"]
        else:
            raise WeightsError(
                f"{src}: no ddkit checkpoint (ckpt/last.pt) or diffusers DiT (config.json) here"
            )
    elif p.suffix in (".pt", ".pth", ".safetensors") or p.is_absolute() or src.startswith("."):
        raise WeightsError(f"{src}: checkpoint not found")
    else:
        subs = ["transformer", ""]

    def load(sub: str):
        kw = {"subfolder": sub} if sub else {}
        return DiTTransformer2DModel.from_pretrained(src, local_files_only=True, torch_dtype=torch.float32, **kw)

    dit = load_first(src, subs, load, "DiT weights")
    made_on = None
    if p.is_dir():  # the record beside the weights, else beside a pipeline's model_index.json
        made_on = folder_record(p / subs[0]) or (folder_record(p) if subs[0] else None)
        src = str(p.resolve())  # stored in checkpoints and records: independent of the working directory
    mcfg = config_from_diffusers(dict(dit.config), pretrained=src, base=expect)
    if expect is not None:
        check_model_config(mcfg, expect, src)
    return dit, mcfg, made_on


def _embedder_copies_equal(weights: dict) -> bool:
    """Whether every block's conditioning-embedder weights in a state dict equal block 0's (see
    :func:`ddkit.models.backbone.tie_conditioning`)."""

    pat = re.compile(r"dit\.transformer_blocks\.(\d+)\.norm1\.emb\.(.+)")
    copies = [(m.group(1), m.group(2), v) for k, v in weights.items() if (m := pat.fullmatch(k))]
    first = {name: v for block, name, v in copies if block == "0"}
    return all(name in first and torch.equal(first[name], v) for block, name, v in copies if block != "0")
