"""The center API's OpenAPI 3 description, written by hand beside the routes.

tests/test_center_api.py holds it to the app: every route is described and
every described path answers with a status it lists.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(name)}}}


def _error(description: str) -> dict[str, Any]:
    return _json("Error", description)


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


FILE_ID = {
    "name": "file_id",
    "in": "path",
    "required": True,
    "description": "The file's id, as the sender printed it.",
    "schema": {"type": "string"},
}

RANGE = {
    "name": "Range",
    "in": "header",
    "required": False,
    "description": "One byte range (bytes=START-END, bytes=START- or bytes=-N). "
    "Several ranges, or a malformed header, get the whole file.",
    "schema": {"type": "string"},
}

IF_RANGE = {
    "name": "If-Range",
    "in": "header",
    "required": False,
    "description": "The ETag of the copy being resumed; another one gets the "
    "whole file.",
    "schema": {"type": "string"},
}

MOMENT = {
    "oneOf": [
        {"type": "string", "format": "date-time"},
        {"type": "number", "description": "seconds since the epoch"},
    ]
}

BYTES = {"type": "string", "format": "binary"}

CONTENT_HEADERS = {
    "Content-Disposition": {
        "description": "The file's name.",
        "schema": {"type": "string"},
    },
    "ETag": {
        "description": "The file's SHA-256, quoted.",
        "schema": {"type": "string"},
    },
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
}


def _content_responses(media: str, what: str) -> dict[str, Any]:
    return {
        "200": {
            "description": f"The whole {what}.",
            "headers": CONTENT_HEADERS,
            "content": {media: {"schema": BYTES}},
        },
        "206": {
            "description": "The byte range asked for.",
            "headers": {
                **CONTENT_HEADERS,
                "Content-Range": {
                    "description": "bytes START-END/SIZE",
                    "schema": {"type": "string"},
                },
            },
            "content": {media: {"schema": BYTES}},
        },
        "404": _error("No such file."),
        "409": _error("The file is not stored (yet), or is not text."),
        "416": _error("The range lies outside the file; Content-Range: bytes */SIZE."),
        "500": _error("The catalog says stored but the bytes are missing."),
        "503": _error("The bytes are in a store this center is not configured for."),
    }


PATHS: dict[str, Any] = {
    "/v1/files": {
        "get": {
            "summary": "List files, newest first, filtered and paged.",
            "operationId": "listFiles",
            "parameters": [
                _query(
                    "type",
                    "Only files of this type.",
                    {"type": "string", "enum": ["text", "image", "video"]},
                ),
                _query("device", "Only files from this device id.", {"type": "string"}),
                _query(
                    "state",
                    "Only files in this state.",
                    {"$ref": "#/components/schemas/State"},
                ),
                _query("since", "Only files first seen at or after this.", MOMENT),
                _query("until", "Only files first seen before this.", MOMENT),
                _query(
                    "limit",
                    "At most this many files.",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                ),
                _query(
                    "offset",
                    "Skip this many files (follow `next` instead of counting).",
                    {"type": "integer", "minimum": 0, "default": 0},
                ),
            ],
            "responses": {
                "200": _json("FileList", "A page of files."),
                "400": _error("A parameter is unknown or malformed; `field` names it."),
            },
        }
    },
    "/v1/files/{file_id}": {
        "get": {
            "summary": "One file: state, size, SHA-256, location, progress.",
            "operationId": "getFile",
            "parameters": [FILE_ID],
            "responses": {
                "200": _json("FileDetail", "The file."),
                "404": _error("No such file."),
            },
        }
    },
    "/v1/files/{file_id}/content": {
        "get": {
            "summary": "Download a stored file, whole or a byte range.",
            "operationId": "getFileContent",
            "parameters": [FILE_ID, RANGE, IF_RANGE],
            "responses": _content_responses("application/octet-stream", "file"),
        }
    },
    "/v1/files/{file_id}/text": {
        "get": {
            "summary": "A stored text file as text/plain; charset=utf-8.",
            "operationId": "getFileText",
            "parameters": [FILE_ID, RANGE, IF_RANGE],
            "responses": _content_responses("text/plain", "text"),
        }
    },
    "/v1/live": {
        "get": {
            "summary": "The dashboard's feed: transfers, queues, gateways, throughput.",
            "operationId": "getLive",
            "responses": {"200": _json("Live", "A snapshot, at most 0.5 s old.")},
        }
    },
    "/healthz": {
        "get": {
            "summary": "Whether the center serves, and its link to RabbitMQ.",
            "operationId": "getHealth",
            "responses": {"200": _json("Health", "The center is up.")},
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics.",
            "operationId": "getMetrics",
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This description.",
            "operationId": "getOpenApi",
            "responses": {
                "200": {
                    "description": "OpenAPI 3.",
                    "content": {JSON: {"schema": {"type": "object"}}},
                }
            },
        }
    },
    "/": {
        "get": {
            "summary": "The live dashboard (HTML).",
            "operationId": "getDashboard",
            "responses": {
                "200": {
                    "description": "The page.",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    },
}

NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_INTEGER = {"type": ["integer", "null"]}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}

FILE_PROPERTIES: dict[str, Any] = {
    "file_id": {"type": "string"},
    "type": {"type": "string", "enum": ["text", "image", "video"]},
    "state": _ref("State"),
    "total_seq": {"type": "integer"},
    "received": {"type": "integer"},
    "received_bytes": {"type": "integer"},
    "packets": {
        "type": "object",
        "properties": {"received": {"type": "integer"}, "total": {"type": "integer"}},
    },
    "file_name": NULLABLE_STRING,
    "content_type": NULLABLE_STRING,
    "device_id": NULLABLE_STRING,
    "expected_sha256": NULLABLE_STRING,
    "expected_xxh128": NULLABLE_STRING,
    "metadata": {"type": ["object", "null"]},
    "size": NULLABLE_INTEGER,
    "sha256": NULLABLE_STRING,
    "location": {
        "type": ["string", "null"],
        "description": "catalog:texts/ID, file:///PATH or s3://BUCKET/KEY",
    },
    "error": NULLABLE_STRING,
    "created_at": NULLABLE_TIME,
    "updated_at": NULLABLE_TIME,
    "stored_at": NULLABLE_TIME,
    "links": {"type": "object", "additionalProperties": {"type": "string"}},
}

SCHEMAS: dict[str, Any] = {
    "State": {
        "type": "string",
        "enum": ["receiving", "assembling", "stored", "failed", "expired"],
    },
    "File": {
        "type": "object",
        "required": ["file_id", "type", "state", "packets", "links"],
        "properties": FILE_PROPERTIES,
    },
    "FileDetail": {
        "allOf": [
            _ref("File"),
            {
                "type": "object",
                "required": ["missing"],
                "properties": {
                    "missing": {
                        "description": "[first, last] seq runs not received yet.",
                        "type": "array",
                        "items": {
                            "type": "array",
                            "items": {"type": "integer"},
                            "minItems": 2,
                            "maxItems": 2,
                        },
                    }
                },
            },
        ]
    },
    "FileList": {
        "type": "object",
        "required": ["files", "limit", "offset", "next"],
        "properties": {
            "files": {"type": "array", "items": _ref("File")},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "next": {
                "type": ["string", "null"],
                "description": "The next page's URL, or null on the last page.",
            },
        },
    },
    "Error": {
        "type": "object",
        "required": ["error", "field", "reason"],
        "properties": {
            "error": {"type": "string"},
            "field": {"type": "string", "description": "What was wrong."},
            "reason": {"type": "string", "description": "Why, and what to do."},
        },
    },
    "Health": {
        "type": "object",
        "properties": {
            "status": {"type": "string"},
            "broker": {"type": "object"},
        },
    },
    "Live": {
        "type": "object",
        "required": [
            "now",
            "in_flight",
            "recent",
            "throughput",
            "queues",
            "gateways",
        ],
        "properties": {
            "now": {"type": "number", "description": "Server time, epoch seconds."},
            "in_flight": {"type": "array", "items": {"type": "object"}},
            "in_flight_count": {"type": "integer"},
            "recent": {"type": "array", "items": {"type": "object"}},
            "throughput": {
                "type": "object",
                "properties": {
                    "bytes_per_second": {"type": "number"},
                    "series": {"type": "array", "items": {"type": "integer"}},
                },
            },
            "states": {"type": "object", "additionalProperties": {"type": "integer"}},
            "queues": {"type": "array", "items": {"type": "object"}},
            "dead_letters": NULLABLE_INTEGER,
            "gateways": {"type": "array", "items": {"type": "object"}},
            "broker": {"type": "object"},
        },
    },
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "datahaul center",
            "version": version("datahaul"),
            "description": "Find, inspect and download the files robots sent, "
            "and watch the pipeline live.",
        },
        "paths": PATHS,
        "components": {"schemas": SCHEMAS},
    }
