"""The backbones a training stage starts with: a resumed checkpoint's, the initial weights it fine-tunes
(``model.pretrained``, RUN/pretrain, ``<stage>.init``), or DiT's random init; and the EMA copy."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ddkit.errors import WeightsError
from ddkit.models import build_backbone, load_backbone, model_config_from_dict
from ddkit.models.checkpoint import resolve_checkpoint
from ddkit.models.provenance import check_record


def initial_backbone(cfg: Any, stage: str) -> tuple[Any, Any]:
    """(Backbone on the CPU, ModelConfig) a training stage starts from when it does not resume.

    ``<stage>.init`` when set; else for ``minimax`` ``model.pretrained``, else ``RUN/pretrain``'s
    checkpoint; for ``pretrain`` ``model.pretrained``, else DiT's random init seeded with ``cfg.seed``.
    With ``trainable: difffit`` the model gets DiffFit gammas on ``difffit_blocks`` blocks. A loaded source
    keeps its own ModelConfig except the VAE choice, taken from ``cfg.model`` when the source has none.

    Args:
        cfg: the ExperimentConfig; stage: ``"pretrain"`` or ``"minimax"``.

    Raises:
        WeightsError: a minimax stage with no initial weights, or :func:`ddkit.models.load_backbone`'s.
        ConfigError: the source differs from ``cfg.model`` (:func:`ddkit.models.load_backbone`).
    """

    tcfg = getattr(cfg, stage)
    blocks = tcfg.difffit_blocks if tcfg.trainable == "difffit" else 0
    init = tcfg.init
    if init is None and stage == "minimax":
        # model.pretrained first: the weights dit/d3hr sample (generate.checkpoint_for), and a stale
        # RUN/pretrain of an earlier run without them must not be fine-tuned instead.
        pre = Path(cfg.run_dir) / "pretrain"
        if cfg.model.pretrained:
            init = cfg.model.pretrained
        elif resolve_checkpoint(pre) is not None:
            init = str(pre)
        else:
            raise WeightsError(
                f"minimax: no initial weights (no {pre}/ckpt/last.pt; set minimax.init or model.pretrained)"
            )
    if init is None and cfg.model.pretrained and stage == "pretrain":
        init = cfg.model.pretrained
    if init is None:
        mcfg = dataclasses.replace(cfg.model, difffit_blocks=blocks)
        return build_backbone(mcfg, seed=cfg.seed, class_embed_std=tcfg.class_embed_std), mcfg
    model, mcfg = load_backbone(
        init, use_ema=True, device="cpu", difffit_blocks=blocks or None,
        timestep_shift=cfg.model.timestep_shift, expect=cfg.model,
    )  # fmt: skip
    # Data-side settings (VAE choice) come from this run's config when the source does not say.
    mcfg = dataclasses.replace(
        mcfg,
        vae=mcfg.vae or cfg.model.vae,
        vae_decoder=mcfg.vae_decoder or cfg.model.vae_decoder,
    )
    model.config = mcfg
    return model, mcfg


def start_backbones(cfg: Any, stage: str, state: dict[str, Any] | None, source: str) -> tuple[Any, Any, Any]:
    """(model, EMA, ModelConfig) a training stage starts with: a resumed checkpoint ``state``'s (``source``:
    its path, for messages), else :func:`initial_backbone` and a copy of it as the EMA. The model's
    ``made_on`` is the record of the weights it starts from (the checkpoint's, or the loaded source's)."""
    if state is None:
        model, mcfg = initial_backbone(cfg, stage)
        return model, clone_backbone(model, mcfg), mcfg
    mcfg = model_config_from_dict(state["model_config"], source)
    model = build_backbone(mcfg, init=False)
    model.load_state_dict(state["model"])
    ema = build_backbone(mcfg, init=False)
    ema.load_state_dict(state["ema"])
    if state.get("made_on") is not None:
        check_record(state["made_on"], source)
        model.made_on = state["made_on"]
    return model, ema, mcfg


def clone_backbone(model: Any, mcfg: Any) -> Any:
    """A second Backbone with the same weights (the EMA; reference ``deepcopy`` + ``update_ema(decay=0)``)."""
    ema = build_backbone(mcfg, init=False)
    ema.load_state_dict(model.state_dict())
    return ema
