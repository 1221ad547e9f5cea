"""`ddkit package`: write a submission (eccv2024 zip, folder, webdataset, generator bundle) or check one."""

from __future__ import annotations

from pathlib import Path

import typer

from ddkit.cli.common import ConfigArg, SetOption, console, handle_errors, load


@handle_errors
def package(
    runs: list[Path] | None = typer.Argument(
        None, help="Run dir(s), gen-<method> dir(s) or dataset.pt file(s); two runs (CIFAR-100 + Tiny-ImageNet) "
        "give one complete eccv2024 archive. Default: the config's run_dir."
    ),
    fmt: str | None = typer.Option(
        None, "--format", "-f", help="eccv2024 | folder | webdataset | eccv2024-generator (default: package.format)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output zip/dir (default: package.out or RUN/...)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Challenge dataset: cifar100 | tinyimagenet."),
    method: str | None = typer.Option(None, "--method", "-m", help="Which RUN/gen-<method> to package."),
    image: Path | None = typer.Option(None, "--image", help="Apptainer image for eccv2024-generator."),
    check: Path | None = typer.Option(None, "--check", help="Validate this submission instead of writing one."),
    partial: bool = typer.Option(False, "--partial", help="--check: accept an archive with one dataset only."),
    tolerance: float = typer.Option(0.02, "--tolerance", help="--check: slack on de-normalised [0, 1] values."),
    config: Path | None = ConfigArg,
    sets: list[str] | None = SetOption,
) -> None:
    """Write a challenge submission from a generated run, or check one (`--check PATH`).

    Exit status: 0 when written (and checked) or when the check passes; 1 when a check fails; 2 on errors.
    """
    from ddkit.package import check_submission, package_run

    if check is not None:
        report = check_submission(check, allow_partial=partial, tolerance=tolerance)
        for v in report.verdicts:
            style = "green" if v.ok else "bold red"
            console.print(f"[{style}]{'OK  ' if v.ok else 'FAIL'}[/] {v.name}: {v.message}", highlight=False,
                          soft_wrap=True)
        if not report.ok:
            raise typer.Exit(1)
        return

    cfg = load(config, sets)
    targets = list(runs) if runs else [Path(cfg.run_dir)]
    written = package_run(
        targets,
        fmt=fmt or cfg.package.format,
        out=out or (Path(cfg.package.out) if cfg.package.out else None),
        dataset=dataset or (cfg.package.dataset if not runs or len(runs) == 1 else None),
        method=method or cfg.package.method,
        image=image or cfg.package.image,
    )
    console.print(f"wrote {written}", highlight=False, soft_wrap=True)
    # A generator bundle without --image shows "FAIL ddkit.sif": it cannot run until the image is built in.
    report = check_submission(written, allow_partial=True)
    for line in report.lines():
        console.print(line, highlight=False, soft_wrap=True)
