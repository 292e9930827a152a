"""CLI commands of the ssl stage (filled in by that stage)."""

COMMANDS: dict = {}
