"""The `datahaul` command: one program, a subcommand per job."""

from __future__ import annotations

import importlib
import sys

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


def _register_commands(argv: list[str]) -> None:
    # A robot runs `datahaul send` often: loading only the module of the
    # command asked for saves the second that importing every backend takes.
    # Help, and anything unrecognised, loads them all.
    asked = [arg for arg in argv[1:] if not arg.startswith("-")][:1]
    wanted = {COMMANDS[asked[0]]} if asked and asked[0] in COMMANDS else None
    for module in dict.fromkeys(COMMANDS.values()):
        if wanted is None or module in wanted:
            importlib.import_module(f"datahaul.cli.{module}").register(app)


def main() -> None:
    _register_commands(sys.argv)
    app()
