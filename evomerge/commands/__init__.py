"""Subcommands of the evomerge CLI, one module each (see evomerge/cli.py)."""
