"""The `datahaul` command: one program, a subcommand per job."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from datahaul.cli import early_hash

if TYPE_CHECKING:
    import typer

# Which module defines each command. Each module adds its commands to the app.
COMMANDS = {
    "gateway": "services",
    "worker": "services",
    "topology": "services",
    "send": "send",
    "files": "catalog",
    "status": "catalog",
    "center": "center",
    "demo": "demo",
    "migrate": "migrate",
    "soak": "soak",
}


def _command_and_arguments(argv: list[str]) -> tuple[str | None, list[str]]:
    words = [arg for arg in argv[1:] if not arg.startswith("-")]
    return (words[0], words[1:]) if words else (None, [])


def _app() -> typer.Typer:
    # Imported here, after the early hash has started: typer, rich and
    # structlog take a good part of the start-up.
    import typer

    from datahaul.cli import common

    app = typer.Typer(
        name="datahaul",
        help="Move large files from robots and vehicles to a center system.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(common.global_options)
    return app


def _register_commands(app: typer.Typer, command: str | None) -> None:
    # A robot runs `datahaul send` often: loading only the module of the
    # command asked for saves the second that importing every backend takes.
    # Help, and anything unrecognised, loads them all.
    wanted = {COMMANDS[command]} if command in COMMANDS else None
    for module in dict.fromkeys(COMMANDS.values()):
        if wanted is None or module in wanted:
            importlib.import_module(f"datahaul.cli.{module}").register(app)


def main() -> None:
    command, arguments = _command_and_arguments(sys.argv)
    if command == "send":
        # Words that name no large file (option values, say) are passed over.
        early_hash.start(arguments, sha256="--sha256" in sys.argv)
    app = _app()
    _register_commands(app, command)
    app()
