"""``ddkit package``: one entry point over every format (:data:`FORMATS`)."""

from __future__ import annotations

from pathlib import Path

from ddkit.distilled import load_distilled
from ddkit.errors import PackageError
from ddkit.package.bundle import package_generator
from ddkit.package.eccv2024 import write_eccv2024
from ddkit.package.writers import write_folder, write_webdataset

FORMATS = ("eccv2024", "folder", "webdataset", "eccv2024-generator")


def package_run(
    gen_dir: str | Path | list[str | Path],
    *,
    fmt: str = "eccv2024",
    out: str | Path | None = None,
    dataset: str | None = None,
    method: str | None = None,
    image: str | Path | None = None,
) -> Path:
    """Package one or more generated runs; return the written archive or directory.

    Args:
        gen_dir: a run dir, a gen dir or a ``dataset.pt`` (a list: one per challenge dataset, ``eccv2024``
            and ``eccv2024-generator`` only, e.g. the CIFAR-100 and the Tiny-ImageNet run together).
        fmt: one of :data:`FORMATS`.
        out: destination; default ``RUN/submission.zip``, ``RUN/distilled``, ``RUN/distilled-wds`` or
            ``RUN/generator``.
        dataset: force the challenge dataset name (``cifar100`` / ``tinyimagenet``) instead of the run's
            ``data.dataset``; only with a single run.
        method: which ``gen-<method>`` when a run dir holds several.
        image: the Apptainer image to put in a generator bundle.

    Raises:
        PackageError: unknown format, a non-challenge dataset in a challenge format, or any check failing on
            the written output (the output is then not left behind).
    """
    runs = list(gen_dir) if isinstance(gen_dir, (list, tuple)) else [gen_dir]
    if fmt not in FORMATS:
        raise PackageError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if not runs:
        raise PackageError("no run given")
    if dataset is not None and len(runs) > 1:
        raise PackageError("--dataset applies to a single run; each of several runs names its own dataset")
    if fmt == "eccv2024-generator":
        return package_generator(runs, out=out, dataset=dataset, method=method, image=image)
    sets = [load_distilled(r, method) for r in runs]
    if fmt == "eccv2024":
        out = Path(out) if out else sets[0].gen_dir.parent / "submission.zip"
        return write_eccv2024(sets, out, dataset=dataset)
    if len(sets) > 1:
        raise PackageError(f"--format {fmt}: one run at a time")
    if fmt == "folder":
        return write_folder(sets[0], Path(out) if out else sets[0].gen_dir.parent / "distilled")
    return write_webdataset(sets[0], Path(out) if out else sets[0].gen_dir.parent / "distilled-wds")


__all__ = ["FORMATS", "package_run"]
