"""CLI commands of the mil stage (filled in by that stage)."""

COMMANDS: dict = {}
