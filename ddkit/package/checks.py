"""``ddkit package --check``: a submission against the scorer's rules, one :class:`Verdict` per file."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from ddkit.errors import PackageError
from ddkit.io import sha256_file
from ddkit.package.contents import check_bundle
from ddkit.package.manifest import MANIFEST, CheckReport, Verdict, _read_optional_json, _sha256_bytes
from ddkit.package.scorer import ECCV2024, IPC, ScorerSpec


def check_submission(path: str | Path, *, allow_partial: bool = False, tolerance: float = 0.02) -> CheckReport:
    """Validate a submission against the scorer's rules; one :class:`Verdict` per file.

    Accepts an ``eccv2024`` zip or the unpacked directory (``cifar100.pt`` / ``tinyimagenet.pt`` at its
    root), a single scorer ``.pt`` file, a ``folder`` directory or a ``webdataset`` directory (told apart by their ``manifest.json``).

    For each scorer file: present at the archive root; loads with ``torch.load(weights_only=True)``; a bare
    tensor (not a dict); float32; shape ``[classes x 10, 3, H, W]`` (a first dimension not divisible by the
    class count means unequal IPC); no NaN/Inf; de-normalised values ``x * std + mean`` within ``[0, 1]``
    +/- ``tolerance``; some negative values and a wide de-normalised span (an un-normalised
    ``[0, 1]`` or ``[-1, 1]`` tensor passes the range test but not these: span >= 0.75); sha256 equal to the manifest's.

    Args:
        allow_partial: accept an archive with only one of the two datasets (the scorer would fail on the
            other; ``ddkit package`` of a single run writes such an archive).
        tolerance: slack on the de-normalised range, in [0, 1] pixel units.

    Raises:
        PackageError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise PackageError(f"{path}: not found")
    if path.is_file() and path.suffix == ".pt":
        spec = ECCV2024.get(path.stem)
        if spec is None:
            return CheckReport(path, "eccv2024", [Verdict(path.name, False, "the scorer loads only "
                                                          "cifar100.pt and tinyimagenet.pt")])
        return CheckReport(path, "eccv2024", [_check_tensor(spec, path.read_bytes(), {}, tolerance)])
    if path.is_dir():
        man = _read_optional_json(path / MANIFEST)
        if man.get("format") in ("folder", "webdataset"):
            return _check_folder(path, man) if man["format"] == "folder" else _check_wds(path, man)
        if man.get("format") == "eccv2024-generator":

            return check_bundle(path, man)
        blobs = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.suffix in (".pt", ".json")}
        nested = [str(p.relative_to(path)) for p in path.rglob("*.pt") if p.parent != path]
    else:
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
                blobs = {n: z.read(n) for n in names if "/" not in n}
                nested = [n for n in names if "/" in n]
        except zipfile.BadZipFile:
            return CheckReport(path, "eccv2024", [Verdict(path.name, False, "not a zip archive")])
    report = CheckReport(path, "eccv2024")
    wanted = {s.filename for s in ECCV2024.values()}
    # A scorer file only below a folder is the classic zip-the-folder mistake; other nested files are ignored.
    misplaced = [n for n in nested if Path(n).name in wanted and Path(n).name not in blobs]
    if misplaced:
        report.verdicts.append(Verdict("archive", False, f"{misplaced[0]} is inside a folder: the scorer reads "
                                       "cifar100.pt and tinyimagenet.pt at the archive root"))
    man = json.loads(blobs[MANIFEST]) if MANIFEST in blobs else {}
    present = [s for s in ECCV2024.values() if s.filename in blobs]
    for spec in ECCV2024.values():
        if spec.filename not in blobs:
            if allow_partial and present:
                report.verdicts.append(Verdict(spec.filename, True, "absent (partial submission: the scorer "
                                               "also loads this file)"))
            else:
                report.verdicts.append(Verdict(spec.filename, False, "missing: the scorer loads it"))
            continue
        report.verdicts.append(_check_tensor(spec, blobs[spec.filename], man, tolerance))
    for n in sorted(blobs):
        if n.endswith(".pt") and n not in {s.filename for s in ECCV2024.values()}:
            report.verdicts.append(Verdict(n, True, "ignored by the scorer"))
    return report


def _check_tensor(spec: ScorerSpec, blob: bytes, man: dict[str, Any], tol: float) -> Verdict:
    import torch

    name = spec.filename
    try:
        data = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        return Verdict(name, False, f"torch.load fails ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    if not torch.is_tensor(data):
        what = f"a dict with keys {sorted(map(str, data))[:4]}" if isinstance(data, dict) else type(data).__name__
        return Verdict(name, False, f"{what}: the scorer needs a bare tensor (torch.save(tensor, path))")
    if data.dtype != torch.float32:
        return Verdict(name, False, f"dtype {str(data.dtype).removeprefix('torch.')}, expected float32")
    shape = tuple(data.shape)
    if len(shape) != 4 or shape[1:] != spec.shape[1:]:
        return Verdict(name, False, f"shape {list(shape)}, expected {list(spec.shape)}")
    n, k = shape[0], spec.num_classes
    if n % k:
        return Verdict(name, False, f"unequal IPC: {n} images are not a multiple of {k} classes")
    if n != k * IPC:
        return Verdict(name, False, f"IPC {n // k}: the scorer asserts exactly {IPC} per class ({list(spec.shape)})")
    counts = ((man.get("datasets") or {}).get(name) or {}).get("class_counts")
    if counts and len(set(counts)) != 1:
        return Verdict(name, False, f"unequal IPC in the manifest's class_counts (min {min(counts)}, max {max(counts)})")
    bad = int((~torch.isfinite(data)).sum())
    if bad:
        return Verdict(name, False, f"{bad} NaN/Inf values")
    m = torch.tensor(spec.mean).view(1, 3, 1, 1)
    s = torch.tensor(spec.std).view(1, 3, 1, 1)
    den = data * s + m
    lo, hi = float(den.min()), float(den.max())
    if lo < -tol or hi > 1 + tol:
        return Verdict(name, False, f"de-normalised values span [{lo:.3f}, {hi:.3f}], outside [0, 1] +/- {tol}: "
                       f"not normalised with mean {spec.mean} std {spec.std}")
    if float(data.min()) >= 0:
        return Verdict(name, False, "no negative values: looks un-normalised (the scorer expects (x - mean) / std)")
    # A real photo set spans nearly all of [0, 1]; [-1, 1] pixels de-normalise to about [0.24, 0.77].
    if hi - lo < 0.75:
        return Verdict(name, False, f"de-normalised values span only [{lo:.3f}, {hi:.3f}]: pixels in [-1, 1] or "
                       "[0, 1] rather than normalised?")
    want = (man.get("files") or {}).get(name)
    if want and want != _sha256_bytes(blob):
        return Verdict(name, False, "sha256 differs from manifest.json")
    return Verdict(name, True, f"float32 {list(shape)}, {k} classes x IPC {IPC}, de-normalised range "
                   f"[{lo:.3f}, {hi:.3f}]")


def _check_folder(path: Path, man: dict[str, Any]) -> CheckReport:
    from PIL import Image

    report = CheckReport(path, "folder")
    counts: dict[str, int] = {}
    sizes: set[tuple[int, int, str]] = set()
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        pngs = sorted(sub.glob("*.png"))
        counts[sub.name] = len(pngs)
        for p in pngs:
            try:
                with Image.open(p) as im:
                    im.load()
                    sizes.add((*im.size, im.mode))
            except Exception as e:  # noqa: BLE001
                report.verdicts.append(Verdict(str(p.relative_to(path)), False, f"unreadable PNG ({e})"))
    report.verdicts.append(_counts_verdict("classes", counts, man))
    report.verdicts.append(Verdict("images", len(sizes) == 1, f"sizes/modes {sorted(sizes)}"))
    report.verdicts.append(_hash_verdict(path, man))
    return report


def _check_wds(path: Path, man: dict[str, Any]) -> CheckReport:
    report = CheckReport(path, "webdataset")
    classes = _read_optional_json(path / "classes.json") or []
    counts = {c: 0 for c in classes} if isinstance(classes, list) else {}
    for tar in sorted(path.glob("*.tar")):
        try:
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    if m.name.endswith(".cls"):
                        k = int(t.extractfile(m).read().decode().strip())
                        key = classes[k] if 0 <= k < len(classes) else str(k)
                        counts[key] = counts.get(key, 0) + 1
        except (tarfile.TarError, ValueError) as e:
            report.verdicts.append(Verdict(tar.name, False, f"unreadable shard ({e})"))
    report.verdicts.append(_counts_verdict("classes", counts, man))
    report.verdicts.append(_hash_verdict(path, man))
    return report


def _counts_verdict(name: str, counts: dict[str, int], man: dict[str, Any]) -> Verdict:
    vals = set(counts.values())
    if not counts or 0 in vals:
        empty = [c for c, n in counts.items() if n == 0]
        return Verdict(name, False, f"no images for class {empty[0]!r}" if empty else "no classes found")
    if len(vals) != 1:
        lo = min(counts, key=counts.get)
        hi = max(counts, key=counts.get)
        return Verdict(name, False, f"unequal IPC: {lo!r} has {counts[lo]}, {hi!r} has {counts[hi]}")
    return Verdict(name, True, f"{len(counts)} classes x IPC {vals.pop()}")


def _hash_verdict(path: Path, man: dict[str, Any]) -> Verdict:
    files = man.get("files") or {}
    for rel, want in files.items():
        p = path / rel
        if not p.is_file():
            return Verdict("sha256", False, f"{rel} listed in manifest.json is missing")
        if sha256_file(p) != want:
            return Verdict("sha256", False, f"{rel} differs from manifest.json")
    return Verdict("sha256", bool(files), f"{len(files)} files match manifest.json" if files else "no manifest")



def check_tensor_file(path: str | Path, spec: ScorerSpec, *, tolerance: float = 0.02) -> Verdict:
    """Check one scorer file (``cifar100.pt`` / ``tinyimagenet.pt``) on disk; see :func:`check_submission`."""
    return _check_tensor(spec, Path(path).read_bytes(), {}, tolerance)


__all__ = ["CheckReport", "Verdict", "check_submission", "check_tensor_file"]
