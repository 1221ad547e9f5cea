"""One class-index mapping (``ddkit.data.classmap``): training, generation and D^3HR condition every dataset
class on the same backbone label, read from the same real shard index."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _wnid_folder(root: Path, wnids) -> Path:
    """``root/{train,val}/<wnid>/0.png``: one random 8 px RGB image per class and split (torchvision
    ImageFolder layout, classes in sorted folder order, as ImageNet's own class indices)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for w in wnids:
            d = root / split / w
            d.mkdir(parents=True)
            px = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(d / "0.png")
    return root


def _labels_everywhere(tmp_path: Path, wnids, class_map: str = "auto") -> dict[str, list[int]]:
    """The backbone label of every dataset class as training (``Trainer.cond_map``), generation
    (``generate.class_layout``) and D^3HR (``d3hr.backbone_labels``, the statistics' cache inputs) use it,
    for a 1,000-class pixel DiT on an ImageFolder of ``wnids`` sharded for real."""
    from ddkit.config import load_config
    from ddkit.data import read_index, shard_dataset
    from ddkit.generate import class_layout
    from ddkit.methods import d3hr
    from ddkit.models import build_backbone
    from ddkit.train import Trainer

    root = _wnid_folder(tmp_path / "inet", wnids)
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "data.dataset=imagefolder", f"data.root={root}", "data.resolution=8",
        "data.channels=3", f"data.shards={tmp_path / 'sh'}", "model.arch=DiT-T/4", "model.in_channels=3",
        "model.input_size=8", "model.num_classes=1000", f"model.class_map={class_map}", "pretrain.batch_size=2",
    ])  # fmt: skip
    shard_dataset(cfg.data)
    index = read_index(cfg.data.shards)
    tr = Trainer(cfg, "pretrain", resume="never", progress=False)
    tr.setup()
    model = build_backbone(cfg.model, seed=0)
    return {
        "train": tr.cond_map.tolist(),
        "generate": class_layout(cfg, model.num_classes)[1],
        "d3hr": d3hr.backbone_labels(index, model, cfg.model.class_map),
        "d3hr_statistics": d3hr.statistics_inputs(model, cfg, index)["labels"],
    }


@pytest.mark.parametrize(("class_map", "expected"), [("auto", [7, 281, 948]), ("identity", [0, 1, 2])])
def test_imagenet_subset_on_1000_class_backbone(tmp_path, class_map, expected):
    """An ImageNet subset (wnid folders: cock, tabby cat, Granny Smith) on a 1,000-class backbone: ``auto``
    conditions each class on its own ImageNet index, ``identity`` on 0..K-1, and all three stages agree."""
    from ddkit.data.registry import imagenet_wnids

    wnids = [imagenet_wnids()[i] for i in (7, 281, 948)]
    labels = _labels_everywhere(tmp_path, wnids, class_map)
    assert labels == dict.fromkeys(labels, expected)


def test_1000_class_dataset_on_1000_class_backbone(tmp_path):
    """All of ImageNet-1k's wnids on a 1,000-class backbone (the case whose rules once differed: training
    mapped by model size, generation and D^3HR by class counts): class k is backbone class k everywhere."""
    from ddkit.data.registry import imagenet_wnids

    labels = _labels_everywhere(tmp_path, imagenet_wnids())
    assert labels == dict.fromkeys(labels, list(range(1000)))
