"""CLI commands of the streaming stage (filled in by that stage)."""

COMMANDS: dict = {}
