"""Settings: defaults that work on one machine, DATAHAUL_* variables, then flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from datahaul.errors import ConfigError

ENV_PREFIX = "DATAHAUL_"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Every knob of datahaul; each is also DATAHAUL_<NAME> in the environment."""

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    data_dir: Path = Path("datahaul-data")
    catalog_url: str = ""
    blob_url: str = ""
    staging_url: str = ""
    queue_type: str = "quorum"
    delivery_limit: int = 5
    quorum_group_size: int = 0
    max_chunk_bytes: int = 16 * MiB
    inline_chunk_bytes: int = 64 * 1024
    max_text_bytes: int = 64 * MiB
    inline_text_bytes: int = 1 * MiB
    bundle_bytes: int = 256 * 1024
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    gateway_url: str = "http://127.0.0.1:8080"
    publish_window: int = 256
    publish_window_bytes: int = 64 * MiB
    confirm_timeout: float = 10.0
    outbox_quota_bytes: int = 2048 * MiB
    ledger_files: int = 10_000
    prefetch: int = 32
    large_prefetch: int = 8
    batch_packets: int = 256
    lease_seconds: float = 30.0
    expire_after: float = 24 * 3600.0
    sweep_interval: float = 5.0

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Defaults, overridden by DATAHAUL_* variables, overridden by flags."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = os.environ.get(ENV_PREFIX + spec.name.upper())
            if raw is not None and raw != "":
                values[spec.name] = _parse(spec.name, spec.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        return settings.with_derived_defaults()

    def with_derived_defaults(self) -> Settings:
        data_dir = self.data_dir.expanduser().resolve()
        if self.queue_type not in ("quorum", "classic"):
            raise ConfigError(
                f"queue_type must be 'quorum' or 'classic', got {self.queue_type!r}"
            )
        if self.quorum_group_size < 0:
            raise ConfigError(
                "quorum_group_size must be 0 (the broker's default) or the number "
                f"of nodes to replicate each queue on, got {self.quorum_group_size}"
            )
        for name in ("prefetch", "large_prefetch"):
            if (value := getattr(self, name)) < 1:
                raise ConfigError(
                    f"{ENV_PREFIX}{name.upper()} must be at least 1 (0 would let "
                    f"RabbitMQ hand one worker a whole queue), got {value}"
                )
        return dataclasses.replace(
            self,
            data_dir=data_dir,
            catalog_url=self.catalog_url or f"sqlite:///{data_dir / 'catalog.db'}",
            blob_url=self.blob_url or f"file://{data_dir / 'blobs'}",
            staging_url=self.staging_url or f"file://{data_dir / 'staging'}",
        )

    @property
    def amqp_urls(self) -> list[str]:
        """The broker addresses, in the order to try them."""
        return [url.strip() for url in self.amqp_url.split(",") if url.strip()]


def _parse(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError:
        raise ConfigError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}"
        ) from None
    return raw
