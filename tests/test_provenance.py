"""ddkit.models.provenance: what a checkpoint or quality table was made on, and the refusal to use it on other
classes without an explicit ``model.class_map`` (issue 23: the shipped MNIST DiT sampled digits labelled as
clothes on Fashion-MNIST, and the plans quoted MNIST's accuracies for it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ddkit.errors import ConfigError, WeightsError
from ddkit.models.provenance import check_classes, check_record, folder_record, record

DIGITS = [str(c) for c in range(10)]
MNIST = {"dataset": "mnist5k", "classes": DIGITS, "class_ids": DIGITS, "imagenet_index": None}
FASHION = {"dataset": "imagefolder", "classes": ["Ankle boot", "Bag", "Coat", "Dress", "Pullover", "Sandal",
                                                 "Shirt", "Sneaker", "T-shirt", "Trouser"]}  # fmt: skip
#: The weights' bytes as shipped before this change (they must stay byte-identical).
SHIPPED_WEIGHTS_SHA256 = "fae97678ba5636d09aab4538a3184e4b5e9e135bce5607eb99528e99e18a515d"


def test_record_keeps_dataset_classes_and_labels():
    assert record(MNIST, range(10)) == {"dataset": "mnist5k", "classes": DIGITS, "class_ids": DIGITS,
                                        "labels": list(range(10))}  # fmt: skip
    assert "labels" not in record(FASHION) and record(FASHION)["class_ids"] == FASHION["classes"]


def test_other_classes_need_an_explicit_class_map():
    made_on = record(MNIST, range(10))
    with pytest.raises(ConfigError) as e:
        check_classes(made_on, FASHION, "auto", labels=list(range(10)), where="ddkit:mnist-dit-t4")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ddkit:mnist-dit-t4: checkpoint made on mnist5k (10 classes: 0, 1, 2")
    assert "the data is imagefolder (10 classes: Ankle boot" in msg and "model.class_map" in msg
    for explicit in ("identity", "imagenet", "/some/map.json"):
        check_classes(made_on, FASHION, explicit, labels=list(range(10)))
    check_classes(made_on, {**MNIST, "dataset": "imagefolder"}, "auto", labels=list(range(10)))  # same digits
    check_classes(None, FASHION, "auto", labels=list(range(10)))  # no record: the class map decides
    with pytest.raises(ConfigError, match="quality table made on mnist5k"):
        check_classes(record(MNIST), FASHION, "auto", what="quality table")
    with pytest.raises(ConfigError):  # same names, another order: label k would mean another class
        check_classes(made_on, {**MNIST, "classes": DIGITS[::-1], "class_ids": DIGITS[::-1]}, "auto", labels=list(range(10)))


def test_an_imagenet_subset_passes_when_every_label_means_the_same_class():
    """A checkpoint made on ImageNet classes (here 4 of them, conditioned on their ImageNet indices) serves a
    subset of them under ``auto``, and classes it never saw keep their pretrained labels; a subset
    conditioned on labels that meant other classes does not."""
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    made_on = record({"dataset": "imagenet", "classes": ["tench", "goldfish", "white shark", "tiger shark"],
                      "class_ids": wnids}, labels=[0, 1, 2, 3])  # fmt: skip
    subset = {"dataset": "imagefolder", "classes": ["n01443537", "n01491361"], "class_ids": wnids[1::2],
              "imagenet_index": [1, 3]}  # fmt: skip
    check_classes(made_on, subset, "auto", labels=[1, 3])
    with pytest.raises(ConfigError, match="model.class_map"):
        check_classes(made_on, subset, "auto", labels=[0, 1])
    # a label the record does not cover keeps its pretrained meaning (Tiny-ImageNet's 200 classes sampled by
    # a DiT-XL/2 fine-tuned on 10 of them): only a conflicting label refuses
    check_classes(made_on, {**subset, "classes": ["n01443537", "n09999999"], "class_ids": ["n01443537", "n09999999"]},
                  "auto", labels=[1, 999])  # fmt: skip


def test_malformed_records_are_named(tmp_path):
    with pytest.raises(WeightsError, match="^x.pt: 'made_on' must be"):
        check_record({"dataset": "m"}, "x.pt")
    with pytest.raises(WeightsError, match="made_on"):
        check_record({"classes": ["a", "b"], "labels": [0]}, "x.pt")
    with pytest.raises(ConfigError, match="t.yaml"):
        check_record("mnist", "t.yaml", ConfigError)
    assert folder_record(tmp_path) is None
    (tmp_path / "ddkit.json").write_text("{torn")
    with pytest.raises(WeightsError, match="ddkit.json: unreadable record"):
        folder_record(tmp_path)


def test_the_shipped_model_and_table_record_mnist_and_keep_their_weights():
    from ddkit.assets import asset_path
    from ddkit.budget import load_quality_table
    from ddkit.models import load_backbone

    folder = Path(asset_path("ddkit:mnist-dit-t4"))
    weights = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == SHIPPED_WEIGHTS_SHA256
    model, _ = load_backbone("ddkit:mnist-dit-t4")
    assert model.made_on == record(MNIST, range(10))
    assert json.loads((folder / "ddkit.json").read_text())["made_on"] == model.made_on
    table = load_quality_table("ddkit:mnist-dit-t4/quality.yaml", index=MNIST)
    assert table.made_on == record(MNIST) and table.measured_with == "dit" and len(table) == 24
    with pytest.raises(ConfigError, match=r"quality.yaml: quality table made on mnist5k .*model.class_map"):
        load_quality_table("ddkit:mnist-dit-t4/quality.yaml", index=FASHION)
    assert load_quality_table("ddkit:mnist-dit-t4/quality.yaml", index=FASHION, class_map="identity")
    assert load_quality_table("ddkit:mnist-dit-t4/quality.yaml") == table  # no index: no check (as before)


def test_a_table_with_a_malformed_record_is_named(tmp_path):
    from ddkit.budget import load_quality_table

    t = tmp_path / "q.yaml"
    t.write_text("method: dit\nmade_on: mnist5k\nrows:\n- {steps: 10, ipc: 10, accuracy: 70}\n")
    with pytest.raises(ConfigError, match=rf"^{t}: 'made_on' must be"):
        load_quality_table(t)
    t.write_text("- {steps: 10, ipc: 10, accuracy: 70}\n")  # an older table without a record: no check
    assert load_quality_table(t, index=FASHION).made_on is None
