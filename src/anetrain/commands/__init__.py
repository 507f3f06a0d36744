"""Thin programs behind the ``anetrain`` subcommands; each module has ``register(subparsers)``."""
