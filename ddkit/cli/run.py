"""`ddkit run` (placeholder: filled in by its issue)."""

import typer


def run() -> None:
    """Not implemented yet."""
    raise typer.Exit(1)
