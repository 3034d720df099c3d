"""The `ragline` command line: `main` holds the commands, `eval` and `tune` the measuring ones, `common` what
they share."""

from ragline.cli.main import EXIT_FILES_FAILED, EXIT_RUN_FAILED, cli, main, run

__all__ = ["EXIT_FILES_FAILED", "EXIT_RUN_FAILED", "cli", "main", "run"]
