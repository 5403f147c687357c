"""The benchmark harness: its parsing, its pairing of figures, and a tiny real run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

# bench/ is a tool next to the package, not installed with it.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pipeline import file_id_from  # noqa: E402
from bench.rabbit import fresh_vhost, rabbitmqctl, round_trip, small_bodies  # noqa: E402
from bench.registry import BenchmarkError, Figure, Options  # noqa: E402
from bench.report import BEGIN, END, comparisons, write_doc  # noqa: E402
from bench.units import flag_name, parse_size, size_name  # noqa: E402

from datahaul.errors import ConfigError  # noqa: E402


def test_sizes_are_read_as_people_write_them() -> None:
    """Plain numbers and K/M/G suffixes (with or without iB) are powers of 1024."""
    assert parse_size("1024") == 1024
    assert parse_size("256K") == 256 * 1024
    assert parse_size("64MiB") == 64 * 1024 * 1024
    assert parse_size("1g") == 1024**3
    assert size_name(256 * 1024) == "256 KiB"
    assert flag_name(1024 * 1024) == "1M"


@pytest.mark.parametrize("text", ["12X", "0", "", "K"])
def test_a_bad_size_is_refused_with_an_example(text: str) -> None:
    """A size that cannot be read raises ConfigError naming it and an example."""
    with pytest.raises(ConfigError, match="256K"):
        parse_size(text)


def test_a_pipeline_figure_is_held_against_the_ceiling_of_its_own_size() -> None:
    """Ratios pair the same queue type and chunk size; memory meets its limit."""
    figures = [
        Figure("bare/quorum/262144", "bare 256K", 200.0, "MB/s"),
        Figure("bare/quorum/1048576", "bare 1M", 100.0, "MB/s"),
        Figure("nats/putget", "nats", 40.0, "MB/s"),
        Figure("pipeline/video/quorum/262144", "pipe 256K", 150.0, "MB/s"),
        Figure("mem/worker/262144", "worker", 151.0, "MB"),
    ]
    checks = {
        (c.figure.key, c.ceiling.key if c.ceiling else None): c
        for c in comparisons(figures)
    }

    versus_bare = checks[("pipeline/video/quorum/262144", "bare/quorum/262144")]
    assert versus_bare.ratio == pytest.approx(0.75)
    assert not versus_bare.met
    assert checks[("pipeline/video/quorum/262144", "nats/putget")].met
    assert not checks[("mem/worker/262144", None)].met
    assert len(checks) == 3


def test_writing_the_doc_keeps_what_is_outside_the_markers(tmp_path: Path) -> None:
    """Only the generated section is replaced; hand-written text stays."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        f"# Intro by hand\n\n{BEGIN}\nold table\n{END}\n\n## Notes by hand\n"
    )

    write_doc(doc, f"{BEGIN}\nnew table\n{END}")

    text = doc.read_text()
    assert "# Intro by hand" in text
    assert "## Notes by hand" in text
    assert "new table" in text
    assert "old table" not in text


@pytest.mark.parametrize(
    "output",
    [
        '{"file_id": "f1", "sha256": "x"}',
        '[{"file_id": "f1"}]',
        '{"files": [{"file_id": "f1"}]}',
        'progress\n{"file_id": "f1"}\n',
    ],
)
def test_the_file_id_is_found_in_the_senders_json(output: str) -> None:
    """The sender's --json output yields the file id in each plausible shape."""
    assert file_id_from(output) == "f1"


def test_a_sender_output_without_file_id_is_an_error() -> None:
    """Output without a file id raises an error quoting what was printed."""
    with pytest.raises(BenchmarkError, match="no file_id"):
        file_id_from("sent 1 file")


async def test_the_bare_client_moves_every_message_and_removes_its_vhost() -> None:
    """A small round trip consumes every byte it published; the vhost is gone after."""
    options = Options(
        file_size=0, chunk_sizes=[], queue_type="quorum", small_size=1024,
        small_count=300, publish_sizes=[], window=64, prefetch=16,
        amqp_url="amqp://guest:guest@127.0.0.1:5672/", nats_url="", nats_chunk=0,
        work_dir=Path("."), timeout=60.0,
    )  # fmt: skip
    async with fresh_vhost(options.amqp_url, "test") as url:
        vhost = url.rsplit("/", 1)[1]
        run = await round_trip(url, "quorum", small_bodies(1024, 300), 300, options)

    assert run.messages == 300
    assert run.payload_bytes == 300 * 1024
    assert 0 < run.publish_seconds <= run.total_seconds
    assert vhost not in (await rabbitmqctl("list_vhosts")).split()


def test_the_command_runs_the_ceilings_and_saves_figures(tmp_path: Path) -> None:
    """`python -m bench` on tiny sizes measures RabbitMQ and NATS and saves JSON."""
    saved = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "bare,bare-1k,nats",
         "--size", "2M", "--chunk-sizes", "256K", "--small-count", "500",
         "--json", str(saved), "--work-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    keys = {figure["key"] for figure in json.loads(saved.read_text())["figures"]}
    assert keys == {
        "bare/quorum/262144", "bare/quorum/1024",
        "nats/put", "nats/get", "nats/putget",
    }  # fmt: skip
    assert list(tmp_path.iterdir()) == [saved]


def test_an_unknown_part_is_refused_with_the_choices() -> None:
    """Asking for a part that does not exist names it and lists the real ones."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "warp-drive"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert done.returncode != 0
    assert "warp-drive" in done.stderr
    assert "pipeline" in done.stderr


def test_the_pipeline_part_measures_a_small_file_end_to_end(tmp_path: Path) -> None:
    """A 2 MiB video goes through gateway and worker; rate and memory are saved."""
    saved = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "pipeline", "--size", "2M",
         "--chunk-sizes", "256K", "--json", str(saved), "--work-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    figures = {f["key"]: f for f in json.loads(saved.read_text())["figures"]}
    assert set(figures) == {
        "pipeline/video/quorum/262144", "mem/gateway/262144", "mem/worker/262144",
    }  # fmt: skip
    assert figures["pipeline/video/quorum/262144"]["value"] > 0
    assert "SHA-256 verified" in figures["pipeline/video/quorum/262144"]["detail"]
    assert figures["mem/worker/262144"]["value"] > 10


def test_sigterm_removes_the_vhost_and_stops_the_services(tmp_path: Path) -> None:
    """A run stopped with SIGTERM leaves no vhost and no gateway or worker behind."""
    harness = subprocess.Popen(
        [sys.executable, "-m", "bench", "--parts", "pipeline", "--size", "512M",
         "--chunk-sizes", "256K", "--work-dir", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        services = wait_for_services(harness.pid, timeout=120)
        harness.send_signal(signal.SIGTERM)
        assert harness.wait(timeout=60) != 0
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()

    assert not [s for s in services if s.is_running() and s.status() != "zombie"]
    vhosts = subprocess.run(
        ["rabbitmqctl", "list_vhosts"], capture_output=True, text=True, check=True
    ).stdout
    assert f"-{harness.pid}-" not in vhosts
    assert list(tmp_path.iterdir()) == []


def test_a_worker_dying_mid_run_fails_the_part_at_once(tmp_path: Path) -> None:
    """Killing the worker ends the pipeline part with its exit code, no figure."""
    saved = tmp_path / "figures.json"
    harness = subprocess.Popen(
        [sys.executable, "-m", "bench", "--parts", "pipeline", "--size", "512M",
         "--chunk-sizes", "256K", "--json", str(saved), "--work-dir", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        services = wait_for_services(harness.pid, timeout=120)
        worker = next(s for s in services if "worker" in " ".join(s.cmdline()))
        worker.kill()
        output, _ = harness.communicate(timeout=90)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()

    assert harness.returncode == 1
    assert "datahaul worker exited with code -9" in output
    record = json.loads(saved.read_text())
    assert record["figures"] == []
    assert "pipeline" in record["failures"]


def wait_for_services(pid: int, timeout: float) -> list[psutil.Process]:
    """The harness's gateway and worker processes, once both have started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children()
        commands = " | ".join(" ".join(child.cmdline()) for child in children)
        if "datahaul worker" in commands and "datahaul gateway" in commands:
            return children
        time.sleep(0.2)
    raise AssertionError(f"the harness started no gateway and worker in {timeout} s")
