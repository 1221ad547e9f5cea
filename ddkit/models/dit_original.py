"""Original-DiT ``.pt`` checkpoints (facebookresearch/DiT, vimar-gu/MinimaxDiffusion) ported to a Backbone.

The original code (DiT ``models.py``) and diffusers' ``DiTTransformer2DModel`` compute the same network
except for one number: the sinusoidal timestep embedding. DiT's ``TimestepEmbedder.timestep_embedding``
uses frequencies ``exp(-log(10000) · i / half)``; diffusers' ``Timesteps(256, flip_sin_to_cos=True,
downscale_freq_shift=1)`` divides by ``half - 1``. A checkpoint keeps the numerics it was trained with
only when the divisor matches, so ported weights get ``ModelConfig.timestep_shift = 0`` (the original
formula) and diffusers folders keep 1 (``facebook/DiT-XL-2-256`` was converted for diffusers and is run
that way by ``DiTPipeline``).

Key mapping (the inverse of diffusers ``scripts/convert_dit_to_diffusers.py``), per block ``i``:
``blocks.i.attn.qkv`` -> ``to_q``/``to_k``/``to_v`` (rows split in three), ``attn.proj`` -> ``to_out.0``,
``mlp.fc1``/``fc2`` -> ``ff.net.0.proj``/``ff.net.2``, ``adaLN_modulation.1`` -> ``norm1.linear`` (same
shift/scale/gate order); ``x_embedder.proj`` -> ``pos_embed.proj``, ``t_embedder.mlp.0``/``2`` and
``y_embedder.embedding_table`` -> the (tied) ``norm1.emb`` of every block, ``final_layer.adaLN_modulation.1``
-> ``proj_out_1``, ``final_layer.linear`` -> ``proj_out_2``. ``pos_embed`` is the fixed 2-D sin-cos table
in both and is not copied. MinimaxDiffusion's DiffFit scales (``blocks.i.attn.gamma1/gamma2``,
``blocks.i.gamma1/gamma2``) become :class:`ddkit.models.backbone.DiffFitGammas`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ddkit.config import ModelConfig
from ddkit.errors import WeightsError
from ddkit.models.backbone import REGISTRY, build_backbone

#: Keys every original-DiT state dict has (used to recognise one).
_MARKERS = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight")


def original_state(blob: Any) -> dict[str, torch.Tensor] | None:
    """The original-DiT state dict inside a loaded ``.pt`` (a bare state dict as DiT's released
    ``DiT-XL-2-256x256.pt``, or a training checkpoint ``{"model", "ema", ...}`` from DiT/Minimax
    ``train.py``, whose ``ema`` is taken, as their ``sample.py`` does), or None when it is not one."""
    if not isinstance(blob, dict):
        return None
    for cand in (blob, blob.get("ema"), blob.get("model")):
        if isinstance(cand, dict) and all(k in cand for k in _MARKERS):
            return {k.removeprefix("module."): v for k, v in cand.items()}
    return None


def original_model_config(state: dict[str, torch.Tensor], *, pretrained: str | None = None):
    """The :class:`ddkit.config.ModelConfig` of an original-DiT state dict (depth, width and patch read from
    the tensors, heads from the registry entry they match; ``timestep_shift = 0``).

    Raises:
        WeightsError: no registry architecture has this depth/width/patch.
    """

    w = state["x_embedder.proj.weight"]  # [hidden, C, p, p]
    hidden, in_ch, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    arch = next(
        (n for n, s in REGISTRY.items() if (s.depth, s.hidden, s.patch) == (depth, hidden, patch)), None
    )
    if arch is None:
        raise WeightsError(
            f"{pretrained or 'checkpoint'}: no registry DiT has depth {depth}, width {hidden}, patch {patch}"
        )
    tokens = int(state["pos_embed"].shape[1]) if "pos_embed" in state else None
    grid = math.isqrt(tokens) if tokens else None
    out_ch = int(state["final_layer.linear.weight"].shape[0]) // (patch * patch)
    gammas = sum(1 for k in state if k.endswith(".attn.gamma1"))
    return ModelConfig(
        arch=arch,
        in_channels=in_ch,
        input_size=grid * patch if grid else 32,
        num_classes=int(state["y_embedder.embedding_table.weight"].shape[0]) - 1,
        learn_sigma=out_ch == 2 * in_ch,
        pretrained=pretrained,
        difffit_blocks=gammas,
        timestep_shift=0,
    )


def diffusers_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename an original-DiT state dict to ddkit Backbone keys (``dit.*`` diffusers names, ``gammas.i.*``);
    see the module docstring for the mapping. Returns a new dict sharing the tensors."""
    out: dict[str, torch.Tensor] = {
        "dit.pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "dit.pos_embed.proj.bias": state["x_embedder.proj.bias"],
        "dit.proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "dit.proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
        "dit.proj_out_2.weight": state["final_layer.linear.weight"],
        "dit.proj_out_2.bias": state["final_layer.linear.bias"],
    }
    emb = {
        "timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
        "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
        "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
        "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
        "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
    }
    for i in range(depth):
        b, d = f"blocks.{i}.", f"dit.transformer_blocks.{i}."
        for new, old in emb.items():
            out[f"{d}norm1.emb.{new}"] = state[old]
        for kind in ("weight", "bias"):
            q, k, v = state[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{d}attn1.to_q.{kind}"], out[f"{d}attn1.to_k.{kind}"], out[f"{d}attn1.to_v.{kind}"] = q, k, v
            out[f"{d}attn1.to_out.0.{kind}"] = state[f"{b}attn.proj.{kind}"]
            out[f"{d}ff.net.0.proj.{kind}"] = state[f"{b}mlp.fc1.{kind}"]
            out[f"{d}ff.net.2.{kind}"] = state[f"{b}mlp.fc2.{kind}"]
            out[f"{d}norm1.linear.{kind}"] = state[f"{b}adaLN_modulation.1.{kind}"]
        if f"{b}attn.gamma1" in state:
            g = f"gammas.{i}."
            out[g + "gamma_qkv"] = state[f"{b}attn.gamma1"]
            out[g + "gamma_proj"] = state[f"{b}attn.gamma2"]
            out[g + "gamma_attn"] = state[f"{b}gamma1"]
            out[g + "gamma_mlp"] = state[f"{b}gamma2"]
    return out


def load_original(
    state: dict[str, torch.Tensor],
    *,
    source: str,
    timestep_shift: int | None = None,
    difffit_blocks: int | None = None,
):
    """A Backbone (eval mode, CPU) from an original-DiT state dict, and its ModelConfig.

    Args:
        state: from :func:`original_state`.
        source: the file, for messages and ``ModelConfig.pretrained``.
        timestep_shift: override of the embedding divisor shift (None: 0, the original code's).
        difffit_blocks: add DiffFit gammas (init 1) to the first N blocks when the source has fewer.

    Raises:
        WeightsError: unknown architecture, or keys that do not match it.
    """

    mcfg = original_model_config(state, pretrained=source)
    if timestep_shift is not None:
        mcfg = dataclasses.replace(mcfg, timestep_shift=timestep_shift)
    if difffit_blocks is not None and difffit_blocks > mcfg.difffit_blocks:
        mcfg = dataclasses.replace(mcfg, difffit_blocks=difffit_blocks)
    model = build_backbone(mcfg, init=False)
    try:
        ported = diffusers_state(state, len(model.dit.transformer_blocks))
    except KeyError as e:
        raise WeightsError(f"{source}: original-DiT key {e.args[0]} missing") from None
    missing, unexpected = model.load_state_dict(ported, strict=False)
    missing = [k for k in missing if not k.startswith("gammas.")]  # added gammas start at 1
    if missing or unexpected:
        raise WeightsError(f"{source}: weights do not match {mcfg.arch} ({(missing + unexpected)[0]} ...)")
    return model.eval(), mcfg
