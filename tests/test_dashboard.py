"""The dashboard in a real browser (Debian's chromium) over the real pipeline.

A gateway, a worker and `datahaul center` run as processes against the test's
RabbitMQ vhost; the page is opened in headless chromium driven by
playwright, files are sent while it watches, and a screenshot is saved to
test-artifacts/dashboard.png for a person to look at.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from playwright.sync_api import Page, sync_playwright

from conftest import PROCESSES, missing_service
from datahaul.faults.processes import (
    HttpHealth,
    ServiceProcess,
    free_port,
    run_coroutine,
)
from pipeline_helpers import SourceFile, post_packets

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SEEN_WITHIN_MS = 30_000


@pytest.fixture
def center(
    request: pytest.FixtureRequest, datahaul_env: dict[str, str], log_dir: Path
) -> Iterator[str]:
    """`datahaul center` on a free port with this test's settings; its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ServiceProcess(
        "center",
        ["center", "--port", str(port)],
        datahaul_env,
        log_dir,
        HttpHealth(f"{url}/healthz"),
    )
    request.node.stash.setdefault(PROCESSES, []).append(process)
    process.start().wait_ready()
    yield url
    process.terminate()


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Page]:
    """A page in headless chromium with a fresh profile, closed afterwards."""
    if not os.path.exists(CHROMIUM):
        missing_service(
            f"{CHROMIUM} is missing; install it with "
            "`apt-get install -y chromium chromium-driver`"
        )
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def publish_poison(amqp_url: str) -> None:
    """A body no worker can decode, straight into the image queue."""

    async def publish() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(b"\x00 not a packet", content_type="application/json"),
                "image_data_queue",
            )

    run_coroutine(publish())


def test_a_file_sent_while_watching_appears_progresses_and_completes(
    center, gateway, worker_factory, datahaul_env, browser_page
) -> None:
    """The page shows a file in flight with its progress, then stored; it shows
    the gateway's link, the queues' consumers and a dead-lettered packet."""
    page = browser_page
    worker_factory("all")
    gateway_url = datahaul_env["DATAHAUL_GATEWAY_URL"]
    photo = SourceFile("dash-photo", "image", os.urandom(12 * 8192), 8192, "photo.jpg")
    video = SourceFile("dash-video", "video", os.urandom(8 * 16384), 16384, "drive.mp4")

    page.goto(center)
    page.wait_for_selector("#feed.live", timeout=SEEN_WITHIN_MS)
    page.wait_for_selector('#gateways tr[data-link="up"]', timeout=SEEN_WITHIN_MS)
    page.wait_for_selector(
        '#queues tr[data-queue="image_data_queue"] td:nth-child(3):text-is("1")',
        timeout=SEEN_WITHIN_MS,
    )

    status, _ = post_packets(gateway_url, photo.packets()[:5])
    assert status == 200
    in_flight = '#in-flight tr[data-file-id="dash-photo"]'
    page.wait_for_selector(
        f'{in_flight}[data-received="5"][data-total="12"]', timeout=SEEN_WITHIN_MS
    )
    assert "5 / 12 packets" in page.inner_text(in_flight)

    publish_poison(datahaul_env["DATAHAUL_AMQP_URL"])
    page.wait_for_selector("#dead-card.alarm", timeout=SEEN_WITHIN_MS)
    assert page.inner_text("#dead-letters") == "1"

    status, _ = post_packets(gateway_url, photo.packets()[5:])
    assert status == 200
    status, _ = post_packets(gateway_url, video.packets()[:3])
    assert status == 200
    stored = '#recent tr[data-file-id="dash-photo"][data-state="stored"]'
    page.wait_for_selector(stored, timeout=SEEN_WITHIN_MS)
    page.wait_for_selector(in_flight, state="detached", timeout=SEEN_WITHIN_MS)
    page.wait_for_selector(
        '#in-flight tr[data-file-id="dash-video"][data-received="3"]',
        timeout=SEEN_WITHIN_MS,
    )

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    link = page.get_attribute(f"{stored} a", "href")
    assert link == "/v1/files/dash-photo/content"
    with urllib.request.urlopen(center + link, timeout=30) as answer:
        assert hashlib.sha256(answer.read()).hexdigest() == photo.sha256
    assert "photo.jpg" in page.inner_text(stored)


def test_the_page_says_when_its_feed_is_lost(center, browser_page) -> None:
    """The page loads with no gateway or worker yet, then says when the center
    stops answering."""
    page = browser_page

    page.goto(center)
    page.wait_for_selector("#feed.live", timeout=SEEN_WITHIN_MS)
    assert page.is_visible("#gateways-empty")
    assert page.is_visible("#in-flight-empty")

    page.route("**/v1/live", lambda route: route.abort())
    page.wait_for_selector("#feed.lost", timeout=SEEN_WITHIN_MS)
    assert "feed lost" in page.inner_text("#feed")


def test_the_page_needs_nothing_from_outside_the_center(center, browser_page) -> None:
    """Every request the page makes goes to the center itself: no CDN."""
    page = browser_page
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    page.goto(center)
    page.wait_for_selector("#feed.live", timeout=SEEN_WITHIN_MS)

    assert requested
    assert all(url.startswith(center) for url in requested), requested
