"""D^3HR class statistics read from a precomputed file (``generate.d3hr.statistics``) instead of inverted.

The generator bundle holds no training images, so it ships the statistics file its run computed
(``RUN/d3hr-cache/d3hr-stats-<key>.pt``, written by :func:`ddkit.methods.d3hr.class_statistics`;
:func:`ddkit.package.contents.find_statistics` picks the one made for the shipped weights). Loading checks what
can be checked without the training images: the classes (the shard index's, in order), the stored
timesteps the D^3HR settings ask for, the backbone's shape attributes and the backbone label of every
class. The weights digest is not recomputed (hashing DiT-XL/2's 675 M parameters would cost budget time);
packaging matched it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddkit.config import ExperimentConfig
from ddkit.errors import ConfigError, DataError
from ddkit.methods.d3hr.inversion import stored_timesteps


def checked_statistics(model, cfg: ExperimentConfig) -> dict[str, Any]:
    """The statistics blob in the file ``cfg.generate.d3hr.statistics``, checked against this run.

    The blob is what :func:`ddkit.methods.d3hr.class_statistics` caches: ``mean``/``var`` float32
    [S, K, C, H, W] over the S stored timesteps and K classes, ``timesteps``, ``classes``, ``counts``,
    ``key``, ``inputs``; ``class_statistics`` turns it into its :class:`~ddkit.methods.d3hr.D3HRStats`.

    Args:
        model: the Backbone generation samples with (``in_channels``, ``input_size``, ``num_classes``,
            ``learn_sigma`` are compared with the file's).
        cfg: the experiment (``generate.d3hr``, ``data.shards`` for the class list, ``model.class_map``).

    Raises:
        ConfigError: the file is missing or unreadable, or it stores other timesteps than the settings ask
            for (``store_from``..``store_to`` on the inversion grid).
        DataError: its classes, backbone shape or class labels differ from this run's.
    """
    import torch

    from ddkit.data import read_index
    from ddkit.data.classmap import backbone_labels

    d = cfg.generate.d3hr
    path = Path(d.statistics)
    if not path.is_file():
        raise ConfigError(f"generate.d3hr.statistics: {path} not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ConfigError(f"generate.d3hr.statistics: {path} unreadable ({type(e).__name__})") from None
    if not isinstance(blob, dict) or not {"mean", "var", "timesteps", "classes", "key"} <= set(blob):
        raise ConfigError(f"generate.d3hr.statistics: {path} is not a D^3HR statistics file")
    index = read_index(cfg.data.shards)
    classes, theirs = list(index["classes"]), list(blob["classes"])
    if classes != theirs:
        pairs = enumerate(zip(classes, theirs, strict=False))
        diff = next((i for i, (a, b) in pairs if a != b), min(len(classes), len(theirs)))
        raise DataError(f"{path}: statistics for {len(theirs)} classes, {cfg.data.shards} has {len(classes)}; "
                        f"they differ at index {diff}")
    store = stored_timesteps(d, cfg.model.num_train_timesteps)
    if [int(t) for t in blob["timesteps"]] != store:
        raise ConfigError(f"generate.d3hr: {path} stores timesteps {list(blob['timesteps'])}, the settings ask for "
                          f"{store} (store_from, store_to, inversion_steps)")
    inputs = blob.get("inputs") or {}
    attrs = [model.in_channels, model.input_size, model.num_classes, bool(model.learn_sigma)]
    if inputs.get("model_attrs", attrs) != attrs:
        raise DataError(f"{path}: made for a backbone with (in_channels, input_size, num_classes, learn_sigma) = "
                        f"{inputs['model_attrs']}, this one has {attrs}")
    labels = backbone_labels(index, model.num_classes, cfg.model.class_map)
    if inputs.get("labels", labels) != labels:
        raise DataError(f"{path}: classes conditioned on other backbone labels than model.class_map="
                        f"{cfg.model.class_map!r} gives")
    return blob
