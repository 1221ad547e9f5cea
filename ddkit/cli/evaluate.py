"""`ddkit evaluate`: train students on distilled sets and baselines, test on real data (library: :mod:`ddkit.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ddkit.cli.common import ConfigArg, SetOption, console, handle_errors, load


def _named(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its directory / file stem), made unique."""
    out: dict[str, str] = {}
    for item in items:
        if "=" in item and not Path(item).exists():
            name, _, path = item.partition("=")
        else:
            p = Path(item)
            path = item
            name = p.name if p.is_dir() else (p.parent.name if p.name == "dataset.pt" else p.stem)
        base, i = name or "set", 2
        while name in out or name in ("random_real", "full"):
            name = f"{base}-{i}"
            i += 1
        out[name] = path
    return out


@handle_errors
def evaluate(
    distilled: list[str] | None = typer.Argument(
        None,
        help="Distilled sets: dataset.pt, a directory holding one, or a normalised tensor .pt; NAME=PATH to name it.",
    ),
    real: Path | None = typer.Option(
        None, "--real", help="Real data shard dir (default: data.shards of the config)."
    ),
    protocol: str | None = typer.Option(
        None, "--protocol", "-p", help="eccv2024, idc or rded (default: evaluate.protocol)."
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Train this many epochs instead of the protocol's."
    ),
    repeats: int | None = typer.Option(None, "--repeats", help="Runs per set (seeds seed..seed+N-1)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output dir (default: RUN/eval)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars and the table."),
    config: Path | None = ConfigArg,
    sets: list[str] | None = SetOption,
) -> None:
    """Score distilled sets against random-real and full-data baselines (same seeds); write results.json and table.md."""
    overrides = list(sets or [])
    if protocol is not None:
        overrides.append(f"evaluate.protocol={protocol}")
    if epochs is not None:
        overrides.append(f"evaluate.epochs={epochs}")
    if repeats is not None:
        overrides.append(f"evaluate.repeats={repeats}")
    cfg = load(config, overrides)
    from ddkit.evaluate import evaluate as lib_evaluate

    out_dir = out or Path(cfg.run_dir) / "eval"
    lib_evaluate(
        _named(list(distilled or [])),
        real or Path(cfg.data.shards),
        cfg.evaluate,
        out_dir=out_dir,
        progress=not no_progress,
    )

    console.print(f"[green]evaluate[/] results: {out_dir / 'results.json'}")
