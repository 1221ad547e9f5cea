"""What every package records: its ``manifest.json``, and where a generated run's shard index lies.

``manifest.json`` (:func:`_manifest`) holds ddkit's version, the format, the creation time, one entry per
dataset (:func:`_entry`: the source ``dataset.pt`` and its sha256, the class order and counts, the
generation's steps, method, budget and hardware, the run config), the sha256 of every written file and the
packaging hardware.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddkit import __version__
from ddkit.distilled import MANIFEST, Distilled
from ddkit.io import hardware_info, read_json
from ddkit.package.scorer import IPC, ScorerSpec


@dataclass
class Verdict:
    """One line of ``ddkit package --check``."""

    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'OK  ' if self.ok else 'FAIL'} {self.name}: {self.message}"


@dataclass
class CheckReport:
    """All verdicts for one submission; ``ok`` when none failed."""

    path: Path
    kind: str
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.verdicts) and all(v.ok for v in self.verdicts)

    def first_failure(self) -> str:
        bad = [v for v in self.verdicts if not v.ok]
        return f"{bad[0].name}: {bad[0].message}" if bad else ""

    def lines(self) -> list[str]:
        return [v.line() for v in self.verdicts]


def _entry(d: Distilled, spec: ScorerSpec | None, perm: list[int]) -> dict[str, Any]:
    gm = d.manifest
    classes = [d.classes[i] for i in perm]
    ipc = IPC if spec else d.ipc
    e: dict[str, Any] = {
        "source": str(d.gen_dir / "dataset.pt"),
        "source_sha256": d.sha256,
        "source_ipc": d.ipc,
        "ipc": ipc,
        "class_order": classes,
        "class_counts": [ipc] * len(classes),
        # the generation manifest's steps, without its per-image list (kept under generation_manifest)
        "steps": ({k: v for k, v in gm["steps"].items() if k != "per_image"} if isinstance(gm.get("steps"), dict)
                  else gm.get("steps")),
        "method": gm.get("method") or d.gen_dir.name.removeprefix("gen-"),
        "budget": {k: v for k, v in gm.items() if "budget" in k or "time" in k or "wall" in k},
        "generation_hardware": gm.get("hardware"),
        "config": d.config,
        "generation_manifest": gm,
    }
    if spec is not None:
        e.update(dataset=spec.name, shape=list(spec.shape), dtype="float32", size=spec.size,
                 normalization={"mean": list(spec.mean), "std": list(spec.std),
                                "transform": "(uint8 / 255 - mean) / std, per channel"},
                 resized_from=list(d.images.shape[-2:]) if d.images.shape[-1] != spec.size else None)
    else:
        e.update(dataset=d.dataset, shape=list(d.images.shape[1:]), dtype="uint8", normalization=None)
    return e


def _manifest(fmt: str, entries: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    return {
        "ddkit_version": __version__,
        "format": fmt,
        "created_unix": time.time(),
        "datasets": entries,
        "files": files,
        "packaging_hardware": hardware_info(),
        "scorer": "DataDistillation/ECCV2024-Dataset-Distillation-Challenge evaluate.py" if fmt.startswith(
            "eccv2024") else None,
    }


def _find_index(d: Distilled) -> Path | None:
    """The run's shard directory holding ``dataset.json`` (``data.shards``, absolute or run-relative)."""
    return next((b for b in _index_candidates(d) if (b / "dataset.json").is_file()), None)


def _index_candidates(d: Distilled) -> list[Path]:
    shards = (d.config.get("data") or {}).get("shards")
    return [Path(shards).absolute(), (d.gen_dir.parent / shards).absolute()] if shards else []


def _index_class_ids(d: Distilled) -> list[str] | None:
    base = _find_index(d)
    if base is None:
        return None
    ids = read_json(base / "dataset.json").get("class_ids")
    return [str(c) for c in ids] if ids else None



def _read_optional_json(p: Path) -> Any:
    return read_json(p) if p.is_file() else {}


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


__all__ = ["MANIFEST"]
