"""`ddkit generate` (placeholder: filled in by its issue)."""

import typer


def generate() -> None:
    """Not implemented yet."""
    raise typer.Exit(1)
