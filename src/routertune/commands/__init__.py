"""CLI verbs. Each module defines ``register(app: typer.Typer)``."""
