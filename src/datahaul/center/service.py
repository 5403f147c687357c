"""The center's resources: the catalog, the blob store, the broker watch.

Catalog calls block, so they run on one thread of their own, which also
owns the thread's database connection; content reads run on a small pool
beside it, so that a long download never holds up the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import structlog

from datahaul.center.broker import BrokerWatch
from datahaul.center.reports import ReportBook
from datahaul.config import Settings
from datahaul.storage.blobs import BlobStore, open_store
from datahaul.storage.catalog import Catalog

log = structlog.get_logger("datahaul.center")

T = TypeVar("T")
CONTENT_READERS = 4
STOP_TIMEOUT = 5.0


class Center:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.book = ReportBook()
        self.broker = BrokerWatch(settings, self.book)
        self._catalog_thread = ThreadPoolExecutor(1, thread_name_prefix="catalog")
        self._readers = ThreadPoolExecutor(
            CONTENT_READERS, thread_name_prefix="content"
        )
        self._catalog: Catalog | None = None
        self._store: BlobStore | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            raise RuntimeError("the center is not started")
        return self._catalog

    @property
    def store(self) -> BlobStore:
        if self._store is None:
            raise RuntimeError("the center is not started")
        return self._store

    async def start(self) -> None:
        """Open the catalog (migrating it if needed) and start watching RabbitMQ."""
        self._catalog = await self.on_catalog(Catalog.open, self.settings.catalog_url)
        self._store = await self.on_reader(open_store, self.settings.blob_url)
        self._tasks.append(asyncio.create_task(self.broker.run(), name="broker"))
        log.info(
            "center.started",
            catalog=self.catalog.db.dialect,
            blobs=self.store.url,
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A broker going down can swallow a cancel; never wait on it forever.
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
        if self._catalog is not None:
            # The connection belongs to the catalog thread; close it there.
            with contextlib.suppress(Exception):
                await self.on_catalog(self._catalog.close)
        self._catalog_thread.shutdown(wait=True, cancel_futures=True)
        self._readers.shutdown(wait=True, cancel_futures=True)

    async def on_catalog(self, call: Callable[..., T], *args: object) -> T:
        """Run a blocking catalog call on the catalog thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._catalog_thread, call, *args)

    async def on_reader(self, call: Callable[..., T], *args: object) -> T:
        """Run a blocking content read on the reader pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, call, *args)
