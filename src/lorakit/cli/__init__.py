"""Command-line interface (see lorakit.cli.main.COMMANDS)."""
