"""The ``folder`` and ``webdataset`` formats, for every dataset.

- ``folder``: ``DIR/<k:03d>_<class>/<i:04d>.png`` + ``DIR/manifest.json``;
- ``webdataset``: ``DIR/distilled-000000.tar`` (keys ``<k:04d>_<i:04d>``, fields ``png`` and ``cls``) +
  ``DIR/classes.json`` + ``DIR/manifest.json``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

from ddkit.distilled import Distilled
from ddkit.errors import PackageError
from ddkit.io import atomic_dir, sha256_file
from ddkit.package.checks import check_submission
from ddkit.package.contents import method_of
from ddkit.package.manifest import MANIFEST, _entry, _manifest


def saved_images(d: Distilled) -> Distilled:
    """The set as image files hold it: as the method saves it (:meth:`ddkit.methods.base.GenerationMethod.saved_images`:
    D^3HR resizes 256 px images to 224 with PIL LANCZOS, as its reference saves them)."""

    return dataclasses.replace(d, images=method_of(d).saved_images(d.images))


def write_folder(d: Distilled, out: str | Path) -> Path:
    """Write ``out/<k:03d>_<class>/<i:04d>.png`` (uint8, as :func:`saved_images`) plus ``manifest.json``,
    atomically."""

    d = saved_images(d)
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        files: dict[str, str] = {}
        for k, cls in enumerate(d.classes):
            sub = tmp / f"{k:03d}_{_safe(cls)}"
            sub.mkdir()
            for i, img in enumerate(d.images[d.labels == k]):
                p = sub / f"{i:04d}.png"
                _to_pil(img).save(p)
                files[str(p.relative_to(tmp))] = sha256_file(p)
        _finish_written(d, "folder", tmp, files, out)
    return out


def write_webdataset(d: Distilled, out: str | Path) -> Path:
    """Write the set (as :func:`saved_images`) as WebDataset shards (``png`` + ``cls`` per sample),
    ``classes.json``, ``manifest.json``."""
    import webdataset as wds

    d = saved_images(d)
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        counters = [0] * len(d.classes)
        with wds.ShardWriter(str(tmp / "distilled-%06d.tar"), maxcount=10000, verbose=0) as sink:
            for img, lab in zip(d.images, d.labels.tolist(), strict=True):
                buf = io.BytesIO()
                _to_pil(img).save(buf, format="PNG")
                sink.write({"__key__": f"{lab:04d}_{counters[lab]:04d}", "png": buf.getvalue(), "cls": lab})
                counters[lab] += 1
        (tmp / "classes.json").write_text(json.dumps(d.classes) + "\n")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        _finish_written(d, "webdataset", tmp, files, out)
    return out


def _to_pil(img):
    """uint8 [C, H, W] tensor -> PIL image (L for one channel, RGB for three)."""
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def _finish_written(d: Distilled, fmt: str, tmp: Path, files: dict[str, str], out: Path) -> None:
    """Write the manifest of a folder/webdataset output in ``tmp`` and check it before it is renamed."""
    entry = _entry(d, None, list(range(len(d.classes))))
    (tmp / MANIFEST).write_text(
        json.dumps(_manifest(fmt, {fmt: entry}, files), indent=2, sort_keys=True, default=str) + "\n"
    )
    report = check_submission(tmp)
    if not report.ok:
        raise PackageError(f"{out}: the written {fmt} output fails its check: {report.first_failure()}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


__all__ = ["saved_images", "write_folder", "write_webdataset"]
