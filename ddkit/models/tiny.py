"""A tiny stand-in for ``facebook/DiT-XL-2-256`` in the real diffusers layout, to rehearse the latent
workflow on a CPU (``python -m ddkit.models.tiny DIR``).

:func:`build_tiny_pipeline` writes, with ``DiTPipeline(...).save_pretrained``, the folder layout the Hub
ships (``model_index.json``, ``transformer/``, ``vae/``, ``scheduler/``):

* ``transformer/``: a ``DiTTransformer2DModel`` with DiT-XL/2's config keys (learn-sigma: 4 in, 8 out
  channels; 1,000 ImageNet classes; patch 2; adaLN-Zero) but 2 blocks of 2 heads x 16 = 32 hidden, at
  ``sample_size`` 8 latents (64 px images). It loads as ``custom(depth=2,hidden=32,heads=2,patch=2)``.
* ``vae/``: an ``AutoencoderKL`` with 4 latent channels and an 8x downsampling (4 levels, as SD-VAE) but
  8-16 channels per level; scaling factor 0.18215.
* ``scheduler/``: the scheduler config DiT ships (``DDIMScheduler``, linear betas 1e-4..0.02, 1,000
  steps; facebook/DiT-XL-2-256 ``scheduler/scheduler_config.json``).

Weights are random (seeded): the chain runs, the images are noise.

:func:`make_wnid_imagefolder` writes an ImageNet-style ``ROOT/{train,val}/<wnid>/*.JPEG`` folder of real
photos (crops of the 20 ImageNet JPEGs PyPI ``foolbox``, a dev dependency, ships), e.g. an Imagewoof
stand-in for ``configs/imagewoof.yaml`` (``--imagefolder DIR --wnids imagewoof``).
"""

from __future__ import annotations

import argparse
import random
from importlib.util import find_spec
from pathlib import Path

import torch

from ddkit.errors import DataError

#: The ``model.*`` settings that describe the tiny pipeline (``--set model.<key>=<value>``).
TINY_MODEL_SETTINGS = {
    "arch": "custom(depth=2,hidden=32,heads=2,patch=2)",
    "in_channels": 4,
    "input_size": 8,
    "num_classes": 1000,
    "learn_sigma": True,
}


def build_tiny_pipeline(out: str | Path, *, sample_size: int = 8, seed: int = 0) -> Path:
    """Write a tiny DiT pipeline folder at ``out`` (see module docstring) and return its path.

    Args:
        out: target directory (created; existing files are overwritten by ``save_pretrained``).
        sample_size: latent side (images are 8x larger: 8 -> 64 px).
        seed: torch seed of the random weights.

    Returns:
        ``Path(out)``, loadable as ``model.pretrained``, ``model.vae`` and ``data.encode_latents``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            dropout=0.0,
            norm_num_groups=32,
            attention_bias=True,
            sample_size=sample_size,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            upcast_attention=False,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
            norm_eps=1e-5,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=8,
            sample_size=8 * sample_size,
            scaling_factor=0.18215,
        )
        # The Hub's DiT holds one conditioning embedder copied into every block (the conversion script
        # copies DiT's t_embedder/y_embedder); equal copies are what ddkit ties (models/backbone.py).
        first = transformer.transformer_blocks[0].norm1.emb.state_dict()
        for blk in transformer.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(first)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
    )
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(out)
    return out


def foolbox_images() -> list:
    """The 20 ImageNet validation JPEGs PyPI foolbox ships (``foolbox/data/imagenet_<i>_<label>.jpg``), as
    RGB PIL images.

    Raises:
        DataError: foolbox is not installed (``pip install foolbox``; ddkit's ``dev`` extra has it).
    """

    from PIL import Image

    spec = find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("foolbox: not installed; pip install foolbox (its 20 ImageNet JPEGs are the stand-in photos)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = sorted(folder.glob("imagenet_*.jpg"))
    if not files:
        raise DataError(f"{folder}: no imagenet_*.jpg files")
    return [Image.open(f).convert("RGB") for f in files]


def make_wnid_imagefolder(
    root: str | Path, wnids: list[str], train_per_class: int, val_per_class: int, size: int = 64
) -> Path:
    """ImageNet-style ``root/{train,val}/<wnid>/*.JPEG``: class ``c`` holds random crops (55-100 % of the
    shorter side, random position, random mirror; seeded) of the foolbox photos ``c, c+K, c+2K, ...`` resized
    to ``size`` px, so every file is a real photograph (not of that class). Returns ``Path(root)``."""

    from PIL import ImageOps

    root = Path(root)
    photos = foolbox_images()
    rng = random.Random(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, w in enumerate(wnids):
            d = root / split / w
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = photos[(c + i * len(wnids)) % len(photos)]
                side = int(min(img.size) * rng.uniform(0.55, 1.0))
                x0, y0 = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
                crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size))
                if rng.random() < 0.5:
                    crop = ImageOps.mirror(crop)
                crop.save(d / f"{w}_{i}.JPEG", quality=90)
    return root


def main(argv: list[str] | None = None) -> None:
    """``python -m ddkit.models.tiny DIR``: build the pipeline and print the ``--set`` flags that use it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="pipeline directory to write")
    ap.add_argument("--sample-size", type=int, default=8, help="latent side; images are 8x (default 8: 64 px)")
    ap.add_argument("--imagefolder", help="also write an ImageNet-style stand-in folder of real photos here")
    ap.add_argument("--wnids", default="imagewoof", help="its classes: imagewoof, imagenette or imageidc")
    ap.add_argument("--per-class", type=int, default=12, help="train images per class (val: a quarter)")
    a = ap.parse_args(argv)
    path = build_tiny_pipeline(a.out, sample_size=a.sample_size).resolve()
    settings = dict(TINY_MODEL_SETTINGS, input_size=a.sample_size)
    flags = [f"model.pretrained={path}", f"model.vae={path}", f"model.vae_decoder={path}"]
    flags += [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
    flags += [f"data.encode_latents={path}", f"data.resolution={8 * a.sample_size}"]
    if a.imagefolder:
        from ddkit.data import registry

        wnids = getattr(registry, f"{a.wnids.upper()}_WNIDS")
        root = make_wnid_imagefolder(a.imagefolder, list(wnids), a.per_class, max(1, a.per_class // 4), 8 * a.sample_size)
        flags.append(f"data.root={root.resolve()}")
    print(f"wrote {path}; use it with:")
    print(" ".join(f"--set '{f}'" for f in flags))


if __name__ == "__main__":
    main()
