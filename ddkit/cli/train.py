"""`ddkit train` (placeholder: filled in by its issue)."""

import typer


def train() -> None:
    """Not implemented yet."""
    raise typer.Exit(1)
