"""`datahaul demo`, the README's first command, run as a user would."""

from __future__ import annotations

import subprocess
import sys

from datahaul.faults.processes import free_port


def test_the_demo_stores_every_sample_and_verifies_it(amqp_url, tmp_path):
    """The demo starts its services, sends its samples, and reports every file
    stored with a matching SHA-256 and the dashboard's address first."""
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "datahaul",
            "demo",
            "--amqp-url",
            amqp_url,
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            str(free_port()),
            "--center-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert demo.stdout.startswith("datahaul demo: dashboard on http://127.0.0.1:")
    assert "all 6 files stored and verified" in demo.stdout
    assert "NO" not in demo.stdout.split("sha256 matches")[1]


def test_files_and_status_refuse_a_data_dir_without_a_catalog(tmp_path):
    """Looking at a folder that holds no catalog is an error, and creates none."""
    missing = tmp_path / "no-such-dir"
    for command in (["files"], ["status", "some-id"]):
        run = subprocess.run(
            [sys.executable, "-m", "datahaul", *command, "--data-dir", str(missing)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 3, run.stderr
        assert "no catalog at" in run.stderr
    assert not missing.exists()
