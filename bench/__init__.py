"""The datahaul benchmark harness: the pipeline measured beside its ceilings.

Run it with `uv run python -m bench` from the project root; `--help` lists
the parts and the sizes that can be chosen.
"""
