"""`ddkit data`: write a dataset as WebDataset shards, inspect a shard set. Logic lives in :mod:`ddkit.data`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ddkit.cli.common import ConfigArg, SetOption, console, handle_errors, is_tty, load
from ddkit.config import replace

app = typer.Typer(no_args_is_help=True, help="Datasets -> WebDataset shards; inspect shard sets.")


@app.command("shard")
@handle_errors
def shard(
    dataset: str = typer.Argument(
        ..., help="mnist5k, imagefolder, cifar100, tinyimagenet, imagewoof, imagenette or imageidc."
    ),
    root: Path | None = typer.Option(None, "--root", help="Raw dataset root (mnist5k needs none)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Shard directory (default: data.shards)."),
    resolution: int | None = typer.Option(
        None, "--resolution", help="Image size in pixels (data.resolution)."
    ),
    shard_size: int | None = typer.Option(
        None, "--shard-size", help="Samples per tar shard (data.shard_size)."
    ),
    encode_latents: str | None = typer.Option(
        None, "--encode-latents", help="VAE dir/HF id (offline): also store each image's latent moments."
    ),
    config: Path | None = ConfigArg,
    sets: list[str] | None = SetOption,
) -> None:
    """Write DATASET's train and test splits as tar shards plus dataset.json and classes.json (skipped when complete)."""
    from ddkit.data import get_reader, read_index, shard_dataset

    cfg = load(config, sets).data
    reader = get_reader(dataset)
    changes: dict = {"dataset": dataset}
    if dataset != cfg.dataset:
        # the config describes another dataset: take this one's native size and channels unless --set
        explicit = {s.partition("=")[0].strip() for s in sets or ()}
        if "data.resolution" not in explicit:
            changes["resolution"] = reader.default_resolution
        if "data.channels" not in explicit:
            changes["channels"] = reader.channels or 3
    if root is not None:
        changes["root"] = str(root)
    if out is not None:
        changes["shards"] = str(out)
    if resolution is not None:
        changes["resolution"] = resolution
    if shard_size is not None:
        changes["shard_size"] = shard_size
    if encode_latents is not None:
        changes["encode_latents"] = encode_latents
    cfg = replace(cfg, **changes)
    path = shard_dataset(cfg, cfg.shards, progress=is_tty())
    idx = read_index(path)
    totals = ", ".join(f"{idx['totals'][s]} {s}" for s in sorted(idx["totals"], key=lambda s: s != "train"))
    console.print(f"[green]ok[/] {path}: {len(idx['classes'])} classes, {totals}", highlight=False)


@app.command("info")
@handle_errors
def info(
    shard_dir: Path = typer.Argument(..., help="A shard directory written by `ddkit data shard`."),
    verify: bool = typer.Option(False, "--verify", help="Recompute every shard's sha256."),
) -> None:
    """Print a shard set's index (dataset.json) as a table: classes and images per split."""

    from ddkit.data import read_index, verify_shards
    from ddkit.data.shards import human_size

    idx = verify_shards(shard_dir) if verify else read_index(shard_dir)
    splits = sorted(idx["counts"], key=lambda s: (s != "train", s != "test", s))
    sizes = {
        s: sum(
            (Path(shard_dir) / n).stat().st_size for n in idx["shards"][s] if (Path(shard_dir) / n).is_file()
        )
        for s in splits
    }
    head = Table.grid(padding=(0, 2))
    head.add_row("dataset", str(idx["dataset"]))
    head.add_row("images", f"{idx['resolution']}x{idx['resolution']}, {idx['channels']} channel(s)")
    head.add_row("classes", str(len(idx["classes"])))
    for s in splits:
        head.add_row(
            s,
            f"{sum(idx['counts'][s].values())} images in {len(idx['shards'][s])} shard(s), {human_size(sizes[s])}",
        )
    head.add_row("mean / std", f"{_fmt(idx['mean'])} / {_fmt(idx['std'])} ({idx.get('stats', '')})")
    lat = idx.get("latent")
    head.add_row(
        "latents", f"{lat['channels']}x{lat['size']}x{lat['size']} from {lat['vae']}" if lat else "no"
    )
    if verify:
        head.add_row("sha256", "[green]all shards match[/]")
    console.print(head)

    table = Table(title=f"{shard_dir}", show_footer=True)
    table.add_column("#", justify="right", footer="")
    table.add_column("class", footer="total")
    table.add_column("id")
    has_in = idx.get("imagenet_index") is not None
    if has_in:
        table.add_column("ImageNet #", justify="right")
    for s in splits:
        table.add_column(s, justify="right", footer=str(sum(idx["counts"][s].values())))
    for i, name in enumerate(idx["classes"]):
        row = [str(i), name, idx["class_ids"][i]]
        if has_in:
            row.append(str(idx["imagenet_index"][i]))
        row += [str(idx["counts"][s].get(name, 0)) for s in splits]
        table.add_row(*row)
    console.print(table)


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
