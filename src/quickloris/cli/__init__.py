"""Command-line interface. Each subcommand is derived from a documented config dataclass."""
