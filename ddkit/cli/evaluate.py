"""`ddkit evaluate` (placeholder: filled in by its issue)."""

import typer


def evaluate() -> None:
    """Not implemented yet."""
    raise typer.Exit(1)
