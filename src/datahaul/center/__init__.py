"""The center system's window: the file API, the live dashboard and its feed.

`datahaul center` serves them from one aiohttp app (see `app.create_app`).
The catalog and the blob stores are read, never written; RabbitMQ is
watched (queue depths, gateway reports), never published to.
"""
