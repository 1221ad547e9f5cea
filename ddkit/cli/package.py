"""`ddkit package` (placeholder: filled in by its issue)."""

import typer


def package() -> None:
    """Not implemented yet."""
    raise typer.Exit(1)
