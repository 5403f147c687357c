"""The benchmark harness: its parsing, its pairing of figures, and a tiny real run."""

from __future__ import annotations

import asyncio
import json
import os
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

from bench.cli import options_from, parser  # noqa: E402
from bench.drive import drive  # noqa: E402
from bench.least import stored  # noqa: E402
from bench.packets import percentile, write_text_files  # noqa: E402
from bench.pipeline import file_id_from, free_port  # noqa: E402
from bench.rabbit import fresh_vhost, rabbitmqctl, round_trip, small_bodies  # noqa: E402
from bench.registry import BenchmarkError, Figure, Options  # noqa: E402
from bench.report import (  # noqa: E402
    BEGIN,
    END,
    comparison_cells,
    comparisons,
    markdown,
    value_text,
    write_doc,
)
from bench.units import flag_name, parse_size, size_name  # noqa: E402

from datahaul.errors import ConfigError  # noqa: E402
from datahaul.sender import default_file_id  # noqa: E402


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


@pytest.mark.parametrize(
    ("figures", "ceiling_key", "ratio"),
    [
        pytest.param(
            [
                Figure("disk/write", "disk", 400.0, "MB/s"),
                Figure("disk/pipeline/quorum/262144", "pipeline disk", 300.0, "MB/s"),
            ],
            "disk/write",
            0.75,
            id="disk writes beside the disk ceiling",
        ),
        pytest.param(
            [
                Figure("cpu/bare/quorum/262144", "bare cpu 256K", 180.0, "MB/cpu-s"),
                Figure("cpu/bare/quorum/1048576", "bare cpu 1M", 200.0, "MB/cpu-s"),
                Figure("cpu/pipeline/quorum/262144", "pipe cpu 256K", 45.0, "MB/cpu-s"),
            ],
            "cpu/bare/quorum/262144",
            0.25,
            id="cpu per byte beside the bare client's of the same size",
        ),
        pytest.param(
            [
                Figure("bare/quorum/1048576", "bare 1M", 250.0, "MB/s"),
                Figure("floor/video/quorum/262144", "floor 256K", 900.0, "MB/s"),
                Figure("floor/video/quorum/1048576", "floor 1M", 200.0, "MB/s"),
            ],
            "bare/quorum/1048576",
            0.8,
            id="the floor's rate beside the bare client's of the same size",
        ),
        pytest.param(
            [
                Figure("bare/quorum/262144", "bare 256K", 200.0, "MB/s"),
                Figure("bare/quorum/1048576", "bare 1M", 250.0, "MB/s"),
                Figure("least/video/quorum/1048576", "least 1M", 225.0, "MB/s"),
            ],
            "bare/quorum/1048576",
            0.9,
            id="the least pipeline beside the bare client of the same size",
        ),
    ],
)
def test_a_bound_is_set_beside_its_ceiling_without_a_target(
    figures: list[Figure], ceiling_key: str, ratio: float
) -> None:
    """The pipeline's disk writes are shown as a share of the disk ceiling,
    its payload per CPU second as a share of the bare client's at the same
    queue type and chunk size; neither row counts as a target met or missed."""
    (check,) = comparisons(figures)

    assert check.ceiling is not None
    assert check.ceiling.key == ceiling_key
    assert check.ratio == pytest.approx(ratio)
    assert check.target == ""
    assert comparison_cells(check)[-1] == "(no target)"


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
    """`python -m bench` on tiny sizes measures RabbitMQ, NATS and the floor
    and saves JSON; the floor's rate follows from its own figures."""
    saved = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "bare,bare-1k,nats,floor",
         "--size", "2M", "--chunk-sizes", "256K", "--small-count", "500",
         "--json", str(saved), "--work-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    figures = {f["key"]: f for f in json.loads(saved.read_text())["figures"]}
    assert set(figures) == {
        "bare/quorum/262144", "cpu/bare/quorum/262144", "bare/quorum/1024",
        "nats/put", "nats/get", "nats/putget",
        "floor/extra", "floor/video/quorum/262144",
    }  # fmt: skip
    assert list(tmp_path.iterdir()) == [saved]

    extra = figures["floor/extra"]["value"]
    assert extra > 0
    assert "one more TCP hop" in figures["floor/extra"]["detail"]
    # With no pipeline in the run, the broker's share is the bare client's:
    # the floor is the bare client's CPU per GiB plus the extra.
    floor = figures["floor/video/quorum/262144"]
    bare_per_gib = 2**30 / 1e6 / figures["cpu/bare/quorum/262144"]["value"]
    cores = os.cpu_count() or 1
    assert floor["value"] == pytest.approx(cores / (bare_per_gib + extra) * 2**30 / 1e6)
    assert "under the bare client)" in floor["detail"]


def test_the_floor_without_the_bare_client_says_which_part_to_add(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "floor", "--size", "2M",
         "--chunk-sizes", "256K", "--work-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode != 0
    assert "add bare to --parts" in done.stderr + done.stdout


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
    """A 2 MiB video goes through gateway and worker; rate, memory and the disk
    writes it caused are saved beside the disk's own ceiling."""
    saved = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "disk,pipeline", "--size", "2M",
         "--chunk-sizes", "256K", "--json", str(saved), "--work-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    figures = {f["key"]: f for f in json.loads(saved.read_text())["figures"]}
    assert set(figures) == {
        "disk/write", "pipeline/video/quorum/262144", "mem/gateway/262144",
        "mem/worker/262144", "disk/pipeline/quorum/262144",
        "cpu/pipeline/quorum/262144",
    }  # fmt: skip
    assert figures["pipeline/video/quorum/262144"]["value"] > 0
    transfer = figures["pipeline/video/quorum/262144"]["detail"]
    assert "SHA-256 verified" in transfer
    assert "disk writes per payload byte" in transfer
    assert figures["mem/worker/262144"]["value"] > 10
    assert figures["disk/write"]["value"] > 0
    assert "MB/s of payload" in figures["disk/pipeline/quorum/262144"]["detail"]
    cpu = figures["cpu/pipeline/quorum/262144"]
    assert cpu["value"] > 0
    assert "sender" in cpu["detail"]
    assert "worker" in cpu["detail"]


def test_the_least_pipeline_part_stores_a_small_file_and_checks_it(
    tmp_path: Path,
) -> None:
    """Robot, relay and store move a 2 MiB file through a quorum queue; the
    rate is set beside the bare client's and the pipeline's beside it."""
    saved = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "bare,least,pipeline",
         "--size", "2M", "--chunk-sizes", "256K", "--json", str(saved),
         "--work-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    figures = {f["key"]: f for f in json.loads(saved.read_text())["figures"]}
    least = figures["least/video/quorum/262144"]
    assert least["value"] > 0
    assert "SHA-256 of the stored file checked" in least["detail"]
    for role in ("robot", "relay", "store", "broker"):
        assert role in figures["cpu/least/quorum/262144"]["detail"]
    paired = {
        (c.figure.key, c.ceiling.key)
        for c in comparisons([Figure(**f) for f in figures.values()])
        if c.ceiling is not None
    }
    assert ("least/video/quorum/262144", "bare/quorum/262144") in paired
    assert ("pipeline/video/quorum/262144", "least/video/quorum/262144") in paired
    assert not list(tmp_path.glob("least-*.image"))


def test_a_store_that_ends_without_its_done_line_fails_the_part() -> None:
    assert stored("done 12.5 ab12") == (12.5, "ab12")
    with pytest.raises(BenchmarkError, match="store said 'ready', not done"):
        stored("ready")


def test_the_least_pipeline_refuses_a_chunk_it_cannot_write_directly(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--parts", "least", "--size", "64K",
         "--chunk-sizes", "1000", "--work-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode != 0
    assert "multiple of 4096; 1000 is not" in done.stdout + done.stderr


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


def test_the_new_targets_pair_each_figure_with_its_own_ceiling() -> None:
    """Text packets meet 8x bare 1 KiB, the outbox 0.8x, latency p99 < 100 ms."""
    figures = [
        Figure("bare/quorum/1024", "bare 1K", 2000.0, "msg/s"),
        Figure("bare-publish/quorum/262144", "publish 256K", 500.0, "msg/s"),
        Figure("pipeline/text/quorum/1024", "text", 17000.0, "packets/s"),
        Figure("outbox/normal/quorum/262144", "up", 300.0, "packets/s"),
        Figure("outbox/accept/quorum/262144", "cut", 250.0, "packets/s"),
        Figure("outbox/drain/quorum/262144", "drain", 350.0, "packets/s"),
        Figure("latency/text/p50", "p50", 20.0, "ms"),
        Figure("latency/text/p99", "p99", 120.0, "ms"),
    ]
    checks = {
        (c.figure.key, c.ceiling.key if c.ceiling else None): c
        for c in comparisons(figures)
    }

    text = checks[("pipeline/text/quorum/1024", "bare/quorum/1024")]
    assert text.ratio == pytest.approx(8.5)
    assert text.met
    accept = checks[("outbox/accept/quorum/262144", "outbox/normal/quorum/262144")]
    assert accept.met
    assert accept.ratio == pytest.approx(250 / 300)
    drain = checks[("outbox/drain/quorum/262144", "bare-publish/quorum/262144")]
    assert drain.ratio == pytest.approx(0.7)
    assert not drain.met
    latency = checks[("latency/text/p99", None)]
    assert latency.target == "< 100 ms"
    assert not latency.met
    assert len(checks) == 4


def test_rates_of_things_are_whole_numbers_and_megabytes_keep_a_decimal() -> None:
    """packets/s and files/s print without decimals; MB/s and ms keep one."""
    assert value_text(Figure("k", "l", 12345.6, "packets/s")) == "12,346 packets/s"
    assert value_text(Figure("k", "l", 99.44, "files/s")) == "99 files/s"
    assert value_text(Figure("k", "l", 99.44, "MB/s")) == "99.4 MB/s"
    assert value_text(Figure("k", "l", 7.25, "ms")) == "7.2 ms"


def test_percentiles_are_taken_by_nearest_rank() -> None:
    """p50 of 1..100 is 50, p99 is 99, the maximum is 100; none of nothing."""
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([3.0], 0.99) == 3.0
    with pytest.raises(BenchmarkError, match="no latency"):
        percentile([], 0.5)


def test_text_files_are_distinct_and_named_by_their_content(tmp_path: Path) -> None:
    """Each file has the asked size, printable bytes and the sender's own file id."""
    files = write_text_files(tmp_path, 5, 3000)

    assert len({item.file_id for item in files}) == 5
    for item in files:
        data = item.path.read_bytes()
        assert len(data) == item.size == 3000
        assert data.isascii()
        assert item.file_id == default_file_id(data)


def test_another_doc_section_goes_after_the_main_one_and_is_replaced(
    tmp_path: Path,
) -> None:
    """A named section is added after the results, then replaced in place."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Intro\n\n{BEGIN}\nmain\n{END}\n\n## Notes by hand\n")
    figure = [Figure("mem/worker/262144", "worker peak RSS", 120.0, "MB")]

    write_doc(doc, markdown(figure, ["- Command: first"], {}, "memory-4g"))
    write_doc(doc, markdown(figure, ["- Command: second"], {}, "memory-4g"))

    text = doc.read_text()
    assert text.index(END) < text.index("<!-- bench:memory-4g:begin -->")
    assert text.index("<!-- bench:memory-4g:end -->") < text.index("## Notes by hand")
    assert "- Command: second" in text
    assert "- Command: first" not in text
    assert "## Latest run: memory-4g" in text
    assert "main" in text


def test_the_outbox_sends_what_the_publish_ceiling_publishes(tmp_path: Path) -> None:
    """By default the outbox part moves the source's bytes; a flag overrides it."""
    for args, expected in (
        ([], 1024**3),
        (["--quick"], 64 * 1024**2),
        (["--size", "256M"], 256 * 1024**2),
        (["--outbox-size", "4M"], 4 * 1024**2),
    ):
        options = options_from(parser().parse_args(args), tmp_path)
        assert options.outbox_size == expected, args


def test_a_bad_doc_section_or_count_is_refused_before_anything_runs() -> None:
    """--doc-section with spaces and --small-per-file 0 fail, naming the flag."""
    for args, flag in (
        (["--doc-section", "Big Run"], "--doc-section"),
        (["--small-per-file", "0"], "--small-per-file"),
        (["--latency-rate", "-5"], "--latency-rate"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "bench", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode != 0
        assert flag in done.stderr


def test_a_child_process_reads_the_same_perf_counter_clock() -> None:
    """perf_counter in another process falls between two readings of ours."""
    before = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", "import time; print(time.perf_counter())"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    after = time.perf_counter()

    assert before <= float(child.stdout) <= after


async def test_the_driven_sender_reports_a_file_it_could_not_send(
    tmp_path: Path,
) -> None:
    """A file that cannot be read fails the driven send with the sender's reason."""
    missing = tmp_path / "gone.txt"

    with pytest.raises(BenchmarkError, match=r"1 of 1 files failed.*gone\.txt"):
        await drive(
            "burst",
            [missing],
            gateway_url=f"http://127.0.0.1:{free_port()}",
            data_type="text",
            chunk="1K",
            work_dir=tmp_path,
            timeout=60.0,
        )
    left = await asyncio.to_thread(lambda: [p.suffix for p in tmp_path.iterdir()])
    assert left == [".log"]


def test_the_packet_parts_measure_small_files_outbox_and_latency(
    tmp_path: Path,
) -> None:
    """small, outbox and latency at tiny sizes save their figures and clean up."""
    saved = tmp_path / "figures.json"
    work = tmp_path / "work"
    work.mkdir()
    harness = subprocess.Popen(
        [sys.executable, "-m", "bench", "--parts", "small,outbox,latency",
         "--small-count", "600", "--small-per-file", "20", "--outbox-size", "4M",
         "--latency-count", "60", "--latency-seconds", "1",
         "--json", str(saved), "--work-dir", str(work)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = harness.communicate(timeout=400)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()

    assert harness.returncode == 0, output
    record = json.loads(saved.read_text())
    figures = {f["key"]: f for f in record["figures"]}
    assert set(figures) == {
        "pipeline/text/quorum/1024", "mem/gateway/text-1024",
        "outbox/normal/quorum/262144", "outbox/accept/quorum/262144",
        "outbox/drain/quorum/262144", "mem/gateway/outbox-262144",
        "latency/text/burst", "latency/text/p50", "latency/text/p99",
        "latency/text/max",
    }  # fmt: skip
    assert "600 packets in 30 files" in figures["pipeline/text/quorum/1024"]["detail"]
    assert "held 16 packets" in figures["outbox/drain/quorum/262144"]["detail"]
    p50, p99 = figures["latency/text/p50"], figures["latency/text/p99"]
    assert 0 < p50["value"] <= p99["value"] <= figures["latency/text/max"]["value"]
    assert list(work.iterdir()) == []
    vhosts = subprocess.run(
        ["rabbitmqctl", "list_vhosts"], capture_output=True, text=True, check=True
    ).stdout
    assert f"-{harness.pid}-" not in vhosts
