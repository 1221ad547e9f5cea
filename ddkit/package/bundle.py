"""The ``eccv2024-generator`` format: the generative track's bundle (entry point, configs, weights, image).

See :func:`package_generator` for the layout and :data:`GENERATE_SH` for the entry point, which runs
:mod:`ddkit.challenge` inside the bundled Apptainer image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from ddkit.distilled import load_distilled
from ddkit.errors import PackageError
from ddkit.io import atomic_dir, sha256_file
from ddkit.package.contents import check_bundle, pack_weights
from ddkit.package.eccv2024 import challenge_dataset
from ddkit.package.manifest import MANIFEST, _find_index, _manifest

GENERATE_SH = r"""#!/bin/sh
# Generative-track entry point: generate --dataset {cifar100,tinyimagenet} --out DIR --time-limit 600
# Runs ddkit.challenge inside the bundled Apptainer image; the bundle is bound read-only at /bundle.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=""
prev=""
for a in "$@"; do
  if [ "$prev" = "--out" ]; then OUT="$a"; fi
  case "$a" in --out=*) OUT="${a#--out=}" ;; esac
  prev="$a"
done
[ -n "$OUT" ] || { echo "generate: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
IMAGE="${DDKIT_IMAGE:-$HERE/ddkit.sif}"
command -v apptainer >/dev/null 2>&1 || { echo "generate: apptainer not found on PATH" >&2; exit 127; }
[ -f "$IMAGE" ] || { echo "generate: image $IMAGE not found (build it: ddkit container build)" >&2; exit 2; }
exec apptainer exec --nv --cleanenv --env HF_HUB_OFFLINE=1 --env DDKIT_BUNDLE=/bundle \
  --bind "$HERE:/bundle:ro" --bind "$OUT:$OUT" \
  "$IMAGE" python -m ddkit.challenge --bundle /bundle "$@"
"""


def package_generator(
    runs: list[str | Path],
    *,
    out: str | Path | None = None,
    dataset: str | None = None,
    method: str | None = None,
    image: str | Path | None = None,
) -> Path:
    """Write the generative-track bundle: entry point, per-dataset configs and weights, the image.

    Layout: ``generate`` (sh entry point, see :data:`GENERATE_SH`), ``configs/<dataset>.yaml`` (the run's
    resolved config with every weight path rewritten relative to the bundle), ``data/<dataset>/``
    (the shard index ``dataset.json`` + ``classes.json``: class names and ImageNet mapping, no images),
    ``weights/<dataset>/...`` (only what sampling reads, Hugging Face ids resolved to local files:
    the sampled backbone, the decoding VAE, the scheduler config and D^3HR's statistics; see
    :mod:`ddkit.package.contents`), ``ddkit.sif`` (copied from ``image`` when given, otherwise built later with
    ``ddkit container build --out BUNDLE/ddkit.sif``), ``manifest.json``. The bundle is checked
    (:func:`ddkit.package.contents.check_bundle`, the image aside) before it is renamed into place.

    Raises:
        PackageError: a run that is not a challenge dataset; weights, statistics or a shard index that
            cannot be found (an HF id missing from the local cache names the key and the id); a bundle
            that fails its check.
    """

    sets = [load_distilled(r, method) for r in runs]
    out = Path(out) if out else sets[0].gen_dir.parent / "generator"
    with atomic_dir(out, overwrite=True) as tmp:
        entries: dict[str, Any] = {}
        for d in sets:
            spec = challenge_dataset(d, dataset)
            cfg = json.loads(json.dumps(d.config))  # deep copy
            run_method = d.manifest.get("method") or d.gen_dir.name.removeprefix("gen-")
            cfg.setdefault("generate", {})["method"] = run_method  # the bundle samples the way the run did
            sources = pack_weights(d, cfg, tmp, spec.name)
            # Generation takes the class list and the backbone class mapping from the shard index.
            index = _find_index(d)
            if index is None:
                raise PackageError(f"{d.gen_dir}: shard index (data.shards/dataset.json) not found; the generator "
                                   "needs its class list and ImageNet mapping")
            ddir = tmp / "data" / spec.name
            ddir.mkdir(parents=True)
            for name in ("dataset.json", "classes.json"):
                if (index / name).is_file():
                    shutil.copy2(index / name, ddir / name)
            cfg.setdefault("data", {})["shards"] = f"data/{spec.name}"
            cfg.setdefault("package", {})["dataset"] = spec.name
            (tmp / "configs").mkdir(exist_ok=True)
            (tmp / "configs" / f"{spec.name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            entries[spec.name] = {**sources, "method": d.manifest.get("method"), "generation": d.manifest}
        (tmp / "generate").write_text(GENERATE_SH)
        (tmp / "generate").chmod(0o755)
        if image is not None:
            if not Path(image).is_file():
                raise PackageError(f"{image}: image not found (ddkit container build first)")
            shutil.copy2(image, tmp / "ddkit.sif")
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        man = _manifest("eccv2024-generator", entries, files)
        man["image"] = "ddkit.sif" if image is not None else None
        man["entry_point"] = "./generate --dataset {cifar100,tinyimagenet} --out DIR --time-limit 600"
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2, sort_keys=True, default=str) + "\n")
        report = check_bundle(tmp, man, require_image=False)
        if not report.ok:
            raise PackageError(f"{out}: the written generator bundle fails its check: {report.first_failure()}")
    return out
