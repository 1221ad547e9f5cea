"""DiT backbones through diffusers' :class:`DiTTransformer2DModel`, with DiffFit gamma scales.

Architectures follow DiT (Peebles & Xie 2023, facebookresearch/DiT ``models.py``: XL/L/B/S with patch
2/4/8); the tiny ``DiT-T`` configs are ddkit's own, small enough to train on two CPU cores.

Three deliberate deviations from a bare ``DiTTransformer2DModel`` make it behave like the reference DiT
(vimar-gu/MinimaxDiffusion ``models.py``):

* **One conditioning embedder.** diffusers gives every block (and the final layer, via block 0) its own
  copy of the timestep + class embedder; the conversion script copies the same DiT weights into each. The
  reference has ONE ``t_embedder``/``y_embedder``. Fine-tuning the class embedding per copy would let the
  copies drift apart, so the copies are tied to block 0's module (lossless when they are equal).
* **Class dropout outside the model.** diffusers' ``LabelEmbedding`` draws its own dropout mask on every
  call, i.e. once per block; the reference drops the label once per sample. The internal dropout is
  disabled (the table keeps the extra CFG row, index ``num_classes``) and the trainer drops labels itself.
* **DiffFit gammas** (Xie et al. 2023; MinimaxDiffusion ``models.py``): on the first N blocks, a scale on
  the qkv projection output (3·hidden), on the attention output projection (hidden), on the attention
  residual branch (hidden) and on the MLP residual branch (hidden), all initialised to 1. They are applied
  with forward hooks so the diffusers state-dict keys (and pretrained weights) stay unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from ddkit.config import ModelConfig
from ddkit.errors import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    """Transformer shape of one registry entry."""

    depth: int
    hidden: int
    heads: int
    patch: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _dit_family() -> dict[str, ArchSpec]:
    sizes = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    out = {}
    for name, (depth, hidden, heads) in sizes.items():
        for patch in (2, 4, 8):
            out[f"DiT-{name}/{patch}"] = ArchSpec(depth, hidden, heads, patch)
    # Tiny pixel-space configs (ddkit): 6 blocks, 4 heads x 32 = 128 hidden, ~2 M parameters.
    out["DiT-T/4"] = ArchSpec(6, 128, 4, 4)
    out["DiT-T/2"] = ArchSpec(6, 128, 4, 2)
    return out


#: Registry name -> :class:`ArchSpec` (DiT-XL/2 ... DiT-S/8 from DiT ``models.py``, plus DiT-T/4, DiT-T/2).
REGISTRY: dict[str, ArchSpec] = _dit_family()


_CUSTOM = re.compile(r"custom\(depth=(\d+),hidden=(\d+),heads=(\d+),patch=(\d+)\)")


def arch_name(spec: ArchSpec) -> str:
    """The registry name of ``spec``, else ``custom(depth=D,hidden=H,heads=N,patch=P)`` (any DiT size, e.g. a
    tiny diffusers stand-in; :func:`arch_spec` parses it back)."""
    name = next((n for n, s in REGISTRY.items() if s == spec), None)
    return name or f"custom(depth={spec.depth},hidden={spec.hidden},heads={spec.heads},patch={spec.patch})"


def arch_spec(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of a registry name or a ``custom(depth=..,hidden=..,heads=..,patch=..)`` name.

    Raises:
        ConfigError: unknown name (the message lists the known ones), or heads not dividing hidden.
    """
    m = _CUSTOM.fullmatch(name.replace(" ", ""))
    if m:
        spec = ArchSpec(*(int(g) for g in m.groups()))
        if min(spec.depth, spec.hidden, spec.heads, spec.patch) < 1 or spec.hidden % spec.heads:
            raise ConfigError(f"model.arch: {name!r}: sizes must be >= 1 and heads must divide hidden")
        return spec
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"model.arch: unknown architecture {name!r} (known: {', '.join(REGISTRY)}, "
            "or custom(depth=D,hidden=H,heads=N,patch=P))"
        ) from None


class DiffFitGammas(nn.Module):
    """The DiffFit scales of one block (MinimaxDiffusion ``models.py``, ``Attention``/``DiTBlock``).

    Parameters (all float32, initialised to 1):
        gamma_qkv [3·hidden]: scales the concatenated q, k, v projections (reference ``Attention.gamma1``);
        gamma_proj [hidden]: scales the attention output projection (reference ``Attention.gamma2``);
        gamma_attn [hidden]: scales the attention residual branch (reference ``DiTBlock.gamma1``);
        gamma_mlp [hidden]: scales the MLP residual branch (reference ``DiTBlock.gamma2``).

    The residual-branch scales commute with adaLN's per-sample gate (both elementwise over the hidden
    dimension), so hooking the attention and MLP module outputs gives the reference's
    ``x + gamma * gate * branch`` exactly.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gamma_qkv = nn.Parameter(torch.ones(3 * hidden))
        self.gamma_proj = nn.Parameter(torch.ones(hidden))
        self.gamma_attn = nn.Parameter(torch.ones(hidden))
        self.gamma_mlp = nn.Parameter(torch.ones(hidden))

    def attach(self, block: nn.Module) -> None:
        """Register the forward hooks on a diffusers ``BasicTransformerBlock``."""
        attn = block.attn1
        h = self.hidden
        attn.to_q.register_forward_hook(_Scale(self, "gamma_qkv", 0, h))
        attn.to_k.register_forward_hook(_Scale(self, "gamma_qkv", h, 2 * h))
        attn.to_v.register_forward_hook(_Scale(self, "gamma_qkv", 2 * h, 3 * h))
        attn.to_out[0].register_forward_hook(_Scale(self, "gamma_proj", 0, h))
        attn.register_forward_hook(_Scale(self, "gamma_attn", 0, h))
        block.ff.register_forward_hook(_Scale(self, "gamma_mlp", 0, h))


class _Scale:
    """Forward hook multiplying a module's output by a slice of a gamma parameter (looked up at call time,
    so a ``deepcopy`` of the model keeps pointing at its own copy through the memo)."""

    def __init__(self, owner: DiffFitGammas, name: str, lo: int, hi: int) -> None:
        self.owner, self.name, self.lo, self.hi = owner, name, lo, hi

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        g = getattr(self.owner, self.name)
        if self.lo != 0 or self.hi != g.shape[0]:
            g = g[self.lo : self.hi]
        return output * g.to(output.dtype)


class Backbone(nn.Module):
    """A class-conditional DiT predicting ε (and the variance interpolation v when ``learn_sigma``).

    Attributes:
        dit: the wrapped diffusers ``DiTTransformer2DModel`` (keys ``dit.*`` in the state dict).
        gammas: DiffFit scales of the first ``config.difffit_blocks`` blocks (keys ``gammas.<i>.*``).
        config: the :class:`ModelConfig` it was built from.
        in_channels, input_size, num_classes, learn_sigma: as in the config; the CFG null class is
            ``num_classes``.
        made_on: the record of the data loaded weights were made on (:mod:`ddkit.models.provenance`), set
            by :func:`ddkit.models.load_backbone`; None for fresh weights or a source without a record.
    """

    made_on: dict | None = None

    def __init__(self, dit: nn.Module, config: ModelConfig, *, tie_embedders: bool | str = True) -> None:
        super().__init__()
        self.dit = dit
        self.config = config
        self.in_channels = config.in_channels
        self.input_size = config.input_size
        self.num_classes = config.num_classes
        self.learn_sigma = config.learn_sigma
        blocks = dit.transformer_blocks
        for blk in blocks:
            # Label dropout happens once per sample in the trainer (see module docstring).
            blk.norm1.emb.class_embedder.dropout_prob = 0.0
        if tie_embedders:
            tie_conditioning(dit, force=tie_embedders == "force")
        set_timestep_shift(dit, 1 if config.timestep_shift is None else config.timestep_shift)
        n = min(config.difffit_blocks, len(blocks))
        self.gammas = nn.ModuleList([DiffFitGammas(dit.inner_dim) for _ in range(n)])
        for g, blk in zip(self.gammas, blocks[: len(self.gammas)], strict=True):
            g.attach(blk)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict noise.

        Args:
            x: float [B, C, H, W] noisy input x_t (pixels in [-1, 1] scale or SD-VAE latents ×0.18215).
            t: int64 [B] timesteps in [0, num_train_timesteps).
            y: int64 [B] backbone class indices; ``num_classes`` is the unconditional (CFG null) class.

        Returns:
            float [B, C, H, W] ε̂, or [B, 2C, H, W] (ε̂ then v in [-1, 1]) when ``learn_sigma``.
        """
        return self.dit(hidden_states=x, timestep=t, class_labels=y).sample

    def trainable_parameters(self, mode: str) -> list[tuple[str, nn.Parameter]]:
        """Mark parameters trainable for ``mode`` ("all" or "difffit") and return the trainable ones.

        DiffFit as MinimaxDiffusion ``train_dit.py`` (``mark_difffit_trainable``): names containing
        ``bias``, ``norm``, ``gamma`` or ``y_embed``. The reference's ``norm`` modules carry no affine
        parameters and its adaLN linear is ``adaLN_modulation``; in diffusers that linear is named
        ``norm1.linear``, so matching the substring would unfreeze ~220 M adaLN weights on DiT-XL/2. Here
        the rule is by role: every bias, every gamma, the class-embedding table and the affine weights of
        real normalisation layers (none in DiT).
        """
        if mode not in ("all", "difffit"):
            raise ConfigError(f"trainable: must be 'all' or 'difffit', got {mode!r}")
        norm_weights = set()
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
                norm_weights.add(id(m.weight))
        out = []
        for name, p in self.named_parameters():
            if mode == "all":
                flag = True
            else:
                flag = (
                    name.endswith("bias")
                    or name.startswith("gammas.")
                    or "class_embedder.embedding_table" in name
                    or id(p) in norm_weights
                )
            p.requires_grad_(flag)
            if flag:
                out.append((name, p))
        return out


def set_timestep_shift(dit: nn.Module, shift: int) -> None:
    """Set the sinusoid divisor ``half - shift`` of every block's timestep embedding (diffusers
    ``Timesteps.downscale_freq_shift``): 0 reproduces facebookresearch/DiT ``TimestepEmbedder`` (see
    :mod:`ddkit.models.dit_original`), 1 is diffusers' DiT default."""
    for blk in dit.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = shift


def tie_conditioning(dit: nn.Module, force: bool = False) -> bool:
    """Make every block use block 0's timestep + class embedder (see module docstring).

    Returns:
        True when tied; False (untouched) when the copies hold different weights, e.g. a model fine-tuned
        untied elsewhere, because tying would change its outputs (``force`` skips that check).
    """
    blocks = dit.transformer_blocks
    first = blocks[0].norm1.emb
    ref = first.state_dict()
    for blk in blocks[1:] if not force else []:
        other = blk.norm1.emb
        if other is first:
            continue
        sd = other.state_dict()
        if any(not torch.equal(ref[k], sd[k]) for k in ref):
            return False
    for blk in blocks[1:]:
        blk.norm1.emb = first
    return True


def make_dit(cfg: ModelConfig, *, init: bool = True, class_embed_std: float = 0.02):
    """A fresh ``DiTTransformer2DModel`` for ``cfg.arch``: DiT's random init (:func:`init_dit_weights`), or
    with ``init=False`` uninitialised memory (fast; DiT-XL/2 init takes seconds) for weights loaded next."""

    from diffusers import DiTTransformer2DModel
    from diffusers.models.modeling_utils import no_init_weights

    spec = arch_spec(cfg.arch)
    if cfg.input_size % spec.patch:
        raise ConfigError(
            f"model.input_size: {cfg.input_size} not divisible by patch {spec.patch} of {cfg.arch}"
        )
    ctx = contextlib.nullcontext() if init else no_init_weights()
    with ctx:
        dit = DiTTransformer2DModel(
            num_attention_heads=spec.heads,
            attention_head_dim=spec.head_dim,
            in_channels=cfg.in_channels,
            out_channels=2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels,
            num_layers=spec.depth,
            sample_size=cfg.input_size,
            patch_size=spec.patch,
            num_embeds_ada_norm=cfg.num_classes,
        )
    if init:
        init_dit_weights(dit, class_embed_std=class_embed_std)
    return dit


@torch.no_grad()
def init_dit_weights(dit: nn.Module, *, class_embed_std: float = 0.02) -> None:
    """DiT's initialisation (facebookresearch/DiT ``models.py``, ``initialize_weights``) on the diffusers
    module names: xavier-uniform linears with zero bias, patch embedding as a linear, N(0, 0.02) class table
    and timestep MLP, and zeroed adaLN modulation and output layers (adaLN-Zero).

    ``class_embed_std`` replaces the table's 0.02: the label is added to a timestep embedding of std ~1, so
    at 0.02 a tiny model trained for minutes never learns to read it (issue 9: right and wrong labels gave
    the same ε-MSE after 1,200 steps; at 1.0 they separate within 300)."""
    for m in dit.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = dit.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(dit.pos_embed.proj.bias)
    for blk in dit.transformer_blocks:
        emb = blk.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=class_embed_std)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(blk.norm1.linear.weight)
        nn.init.zeros_(blk.norm1.linear.bias)
    for lin in (dit.proj_out_1, dit.proj_out_2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    # Copies start equal so that tie_conditioning ties them.
    first = dit.transformer_blocks[0].norm1.emb.state_dict()
    for blk in dit.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(first)


def build_backbone(
    model_cfg: ModelConfig, *, seed: int | None = None, init: bool = True, class_embed_std: float = 0.02
) -> Backbone:
    """A :class:`Backbone` for ``model_cfg``: DiT's random init (``seed`` fixes it when given), or with
    ``init=False`` uninitialised weights (DiffFit gammas still 1) that the caller overwrites with
    ``load_state_dict`` — the conditioning embedders are tied regardless. ``class_embed_std``: see
    :func:`init_dit_weights`.

    Raises:
        ConfigError: unknown ``arch`` or an input size the patch does not divide.
    """
    if not init:
        return Backbone(make_dit(model_cfg, init=False), model_cfg, tie_embedders="force")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dit = make_dit(model_cfg, class_embed_std=class_embed_std)
    else:
        dit = make_dit(model_cfg, class_embed_std=class_embed_std)
    return Backbone(dit, model_cfg)


#: The ModelConfig keys a diffusers DiT folder determines (checked against the run's config on load).
DIFFUSERS_KEYS = ("arch", "in_channels", "input_size", "num_classes", "learn_sigma")


def config_from_diffusers(
    dit_config: dict, *, pretrained: str | None = None, base: ModelConfig | None = None
) -> ModelConfig:
    """The :class:`ModelConfig` of a diffusers DiT config (``config.json``): a registry name when the
    depth/width/heads/patch match one, else a ``custom(...)`` name (:func:`arch_name`). The remaining keys
    (VAE, DiffFit blocks, ...) come from ``base``."""

    heads, head_dim = dit_config["num_attention_heads"], dit_config["attention_head_dim"]
    spec = ArchSpec(dit_config["num_layers"], heads * head_dim, heads, dit_config["patch_size"])
    in_ch = dit_config["in_channels"]
    out_ch = dit_config.get("out_channels") or in_ch
    base = base or ModelConfig()
    return dataclasses.replace(
        base,
        arch=arch_name(spec),
        in_channels=in_ch,
        input_size=dit_config["sample_size"],
        num_classes=dit_config["num_embeds_ada_norm"],
        learn_sigma=out_ch == 2 * in_ch,
        pretrained=pretrained,
    )


def check_model_config(loaded: ModelConfig, expected: ModelConfig, source: str) -> None:
    """Raise when the run's ``model.*`` keys (``expected``) disagree with what ``source`` holds (``loaded``),
    so the run config and report never name a model that was not used.

    Raises:
        ConfigError: one line listing every differing ``model.<key>`` and what the folder holds.
    """
    bad = [k for k in DIFFUSERS_KEYS if getattr(loaded, k) != getattr(expected, k)]
    if bad:
        said = ", ".join(f"{k}={getattr(expected, k)!r}" for k in bad)
        holds = " ".join(f"--set 'model.{k}={_yaml(getattr(loaded, k))}'" for k in DIFFUSERS_KEYS)
        raise ConfigError(f"model: config says {said} but {source} holds {holds}")


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
