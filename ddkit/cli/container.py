"""`ddkit container build|run|lint`: the Apptainer image. Each prints the exact apptainer command first."""

from __future__ import annotations

from pathlib import Path

import typer

from ddkit.cli.common import console, handle_errors
from ddkit.container import DEFAULT_DEF, lint_definition
from ddkit.container import build as do_build
from ddkit.container import run as do_run

app = typer.Typer(no_args_is_help=True, help="Build and run the Apptainer image (containers/ddkit.def).")


def _echo(line: str) -> None:
    console.print(f"[dim]$[/] {line}", highlight=False, soft_wrap=True)


@app.command("build")
@handle_errors
def build(
    definition: Path = typer.Option(None, "--def", help="Definition file (default: containers/ddkit.def)."),
    out: Path = typer.Option(Path("ddkit.sif"), "--out", "-o", help="Image to write."),
    fakeroot: bool | None = typer.Option(None, "--fakeroot/--no-fakeroot",
                                            help="Default: --fakeroot when not root."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing image."),
) -> None:
    """Lint the definition and run `apptainer build [--fakeroot] IMAGE DEF` from the repository root."""

    do_build(definition or DEFAULT_DEF, out.resolve(), fakeroot=fakeroot, force=force, echo=_echo)


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def run(
    ctx: typer.Context,
    image: Path = typer.Option(Path("ddkit.sif"), "--image", "-i", help="The .sif image."),
    data: Path | None = typer.Option(None, "--data", help="Bind read-only at the same path (shards, raw data)."),
    weights: Path | None = typer.Option(None, "--weights", help="HF cache dir: bound read-only, HF_HOME."),
    out: Path | None = typer.Option(None, "--out", help="Bind read-write at the same path (runs)."),
    bind: list[str] | None = typer.Option(None, "--bind", "-B", help="Extra bind src[:dst[:opts]]."),
    nv: bool = typer.Option(True, "--nv/--no-nv", help="Bind the NVIDIA driver (apptainer --nv)."),
) -> None:
    """Run `ddkit ARGS...` inside the image: `ddkit container run --data D --out R -- generate -c cfg.yaml`."""

    def absolute(p: Path | None) -> str | None:
        return str(p.resolve()) if p is not None else None

    code = do_run(image, list(ctx.args), data=absolute(data), weights=absolute(weights), out=absolute(out),
                  binds=list(bind or ()), nv=nv, echo=_echo)
    raise typer.Exit(code)


@app.command("lint")
@handle_errors
def lint(definition: Path = typer.Argument(None, help="Definition file (default: containers/ddkit.def).")) -> None:
    """Strict lint: Apptainer section names and header keys, `sh -n` on script sections, %files sources."""

    problems = lint_definition(definition or DEFAULT_DEF)
    for p in problems:
        console.print(f"[bold red]FAIL[/] {p}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]OK[/] {definition or DEFAULT_DEF}", highlight=False)
