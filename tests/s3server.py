"""A real S3-protocol server for tests: moto's standalone server on 127.0.0.1.

    with S3Server() as server:
        server.create_bucket("blobs")
        store = S3Store.open(server.store_url("blobs", "images"))

It runs in threads of the test process, keeps objects in memory, and accepts
any credentials; datahaul's clients are given the dummy ones below, through
the store URL or the standard AWS_* variables (`server.env`).
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "datahaul-test-access"
SECRET_KEY = "datahaul-test-secret-" + secrets.token_hex(8)
REGION = "us-east-1"


class S3Server:
    """moto's S3 server on a free port; stopped, with its objects, on exit."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.endpoint = ""

    def __enter__(self) -> S3Server:
        # Werkzeug logs every request at INFO: too loud for a test's output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop()

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client's credentials here."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def store_url(
        self, bucket: str, prefix: str = "", *, credentials: bool = True, **extra: Any
    ) -> str:
        """An s3:// store URL for datahaul, with the credentials in it or not."""
        query: dict[str, Any] = {"endpoint": self.endpoint, "region": REGION}
        if credentials:
            query.update(access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        query.update(extra)
        return f"s3://{bucket}/{prefix}?{urlencode(query)}"

    def client(self) -> S3Client:
        """A plain boto3 client, to look at the bucket behind datahaul's back."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """A new empty bucket (a random name unless given); returns its name."""
        bucket = name or f"datahaul-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=bucket)
        return bucket
