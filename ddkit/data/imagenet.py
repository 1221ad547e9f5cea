"""The ImageNet-1k class index: the 1,000 wnids in DiT/torchvision class order, wnid lemmas, and the wnid
lists of the ImageNet subsets ddkit reads (Imagenette, ImageWoof, ImageIDC).

An ImageNet-pretrained DiT is conditioned on these indices; :mod:`ddkit.data.registry` records each
dataset's ``imagenet_index`` from here and :mod:`ddkit.data.classmap` maps classes with it. The 1,000 wnids
come from timm (``timm.data.ImageNetInfo``, which maps index <-> wnid <-> lemma).
"""

from __future__ import annotations

from functools import lru_cache

# ImageNet subsets. Order = subset class index.
# Imagenette / ImageWoof: fast.ai's class lists, in the order used by the Minimax Diffusion reference
# (vimar-gu/MinimaxDiffusion misc/class_nette.txt, misc/class_woof.txt).
IMAGENETTE_WNIDS = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)  # fmt: skip
IMAGEWOOF_WNIDS = (
    "n02096294", "n02093754", "n02111889", "n02088364", "n02086240",
    "n02089973", "n02087394", "n02115641", "n02099601", "n02105641",
)  # fmt: skip
# ImageIDC = IDC's ImageNet-10 (Kim et al., ICML 2022; snu-mllab/Efficient-Dataset-Condensation data.py,
# ``find_subclasses(nclass=10, seed=0)`` takes the first 10 lines of its class100.txt, which is the
# ImageNet-100 list of CMC, HobbitLong/CMC imagenet100.txt). Minimax Diffusion evaluates on this subset.
IMAGEIDC_WNIDS = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406",
    "n02091831", "n04517823", "n04589890", "n03062245", "n01773797",
)  # fmt: skip


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted; index = DiT/torchvision class index).

    Source: ``timm.data.ImageNetInfo`` (timm/data/_info/imagenet_synsets.txt).
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_label_name(i) for i in range(info.num_classes()))


def imagenet_index_of(wnids: list[str] | tuple[str, ...]) -> list[int] | None:
    """ImageNet-1k indices of ``wnids``, or None when any of them is not an ImageNet-1k class."""
    pos = {w: i for i, w in enumerate(imagenet_wnids())}
    if not wnids or any(w not in pos for w in wnids):
        return None
    return [pos[w] for w in wnids]


def imagenet_lemma(wnid: str) -> str | None:
    """First lemma of an ImageNet-1k wnid (``n01440764`` -> ``tench``), None when unknown."""
    from timm.data import ImageNetInfo

    try:
        desc = ImageNetInfo().label_name_to_description(wnid)
    except (KeyError, ValueError):
        return None
    return desc.split(",")[0].strip() if desc else None
