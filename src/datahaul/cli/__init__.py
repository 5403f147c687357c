"""The `datahaul` command: one program, a subcommand per job."""

from __future__ import annotations

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


def _register_commands() -> None:
    # Each command lives in its own module and adds itself to the app.
    from datahaul.cli import catalog, center, demo, migrate, send, services, soak

    for module in (services, send, catalog, center, demo, migrate, soak):
        module.register(app)


def main() -> None:
    _register_commands()
    app()
