"""The gateway's HTTP API against a real gateway process and RabbitMQ."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json

import pytest

from datahaul.protocol import wire
from datahaul.protocol.packet import Packet
from pipeline_helpers import call, post_packets

CHUNK_LIMIT = 100_000


@pytest.fixture
def small_chunk_gateway(gateway_factory, datahaul_env):
    """A gateway that refuses chunks over 100 kB; its base URL."""
    gateway_factory(env={"DATAHAUL_MAX_CHUNK_BYTES": str(CHUNK_LIMIT)})
    return datahaul_env["DATAHAUL_GATEWAY_URL"]


def _good(**changes):
    packet = {
        "type": "image",
        "file_id": "pic-1",
        "seq": 1,
        "total_seq": 4,
        "data": base64.b64encode(b"pixels").decode(),
    }
    packet.update(changes)
    return packet


BAD_JSON = [
    ({"seq": None}, 400, "seq"),
    ({"seq": "one"}, 400, "seq"),
    ({"seq": 0}, 400, "seq"),
    ({"seq": 5}, 400, "seq"),
    ({"total_seq": 0, "seq": 0}, 400, "total_seq"),
    ({"type": "audio"}, 400, "type"),
    ({"data": "not base64!"}, 400, "data"),
    ({"file_id": "../../etc/passwd"}, 400, "file_id"),
    ({"file_id": 42}, 400, "file_id"),
    ({"metadata": "a string"}, 400, "metadata"),
    ({"chunk_sha256": "f" * 64}, 400, "chunk_sha256"),
    ({"chunk_xxh128": "f" * 32}, 400, "chunk_xxh128"),
    ({"data": base64.b64encode(b"x" * (CHUNK_LIMIT + 1)).decode()}, 413, "data"),
]


@pytest.mark.parametrize(("changes", "status", "field"), BAD_JSON)
def test_bad_packets_get_a_4xx_naming_the_field(
    small_chunk_gateway, changes, status, field
):
    """Each kind of bad packet is refused with its status and the field named,
    and the gateway goes on serving good packets."""
    code, answer = post_packets(small_chunk_gateway, [_good(**changes)])
    assert (code, answer["field"]) == (status, field), answer
    assert answer["reason"]

    code, answer = post_packets(small_chunk_gateway, [_good(seq=2)])
    assert code == 200, answer


def test_a_missing_field_is_named(small_chunk_gateway):
    """A packet without `total_seq` is refused naming `total_seq`."""
    packet = _good()
    del packet["total_seq"]
    code, answer = post_packets(small_chunk_gateway, [packet])
    assert (code, answer["field"]) == (400, "total_seq")


def test_conflicts_with_earlier_packets_are_409(small_chunk_gateway):
    """A packet whose total_seq or type differs from its file's gets 409."""
    assert post_packets(small_chunk_gateway, [_good(file_id="c1")])[0] == 200
    code, answer = post_packets(
        small_chunk_gateway, [_good(file_id="c1", seq=2, total_seq=9)]
    )
    assert (code, answer["field"]) == (409, "total_seq")
    code, answer = post_packets(
        small_chunk_gateway, [_good(file_id="c1", seq=2, type="video")]
    )
    assert (code, answer["field"]) == (409, "type")


def test_a_batch_is_refused_whole_naming_the_packet(small_chunk_gateway):
    """One bad packet in an array refuses the array and says which one."""
    batch = [_good(file_id="b1", seq=1), _good(file_id="b1", seq=99)]
    code, answer = post_packets(small_chunk_gateway, batch)
    assert (code, answer["field"], answer["index"]) == (400, "seq", 1)
    status = call(f"{small_chunk_gateway}/v1/files/b1")
    assert status[0] == 404


@pytest.mark.parametrize(
    ("body", "content_type", "field"),
    [
        (b"{not json", "application/json", "$"),
        (b"[]", "application/json", "$"),
        (b"42", "application/json", "$"),
        (json.dumps(_good()).encode() + b"\n{oops\n", "application/x-ndjson", "$"),
    ],
)
def test_malformed_bodies_are_400(small_chunk_gateway, body, content_type, field):
    """Bodies that are not packets at all are refused with a 400."""
    code, answer = call(
        f"{small_chunk_gateway}/v1/packets",
        body,
        method="POST",
        headers={"Content-Type": content_type},
    )
    assert (code, answer["field"]) == (400, field), answer


def test_raw_chunks_are_checked_like_json_packets(small_chunk_gateway):
    """A raw PUT without its type, with a bad seq, or over the limit is refused
    naming the field; a good one is accepted."""
    url = f"{small_chunk_gateway}/v1/files/raw-1/chunks"
    headers = {"X-Datahaul-Type": "video", "X-Datahaul-Total-Seq": "2"}
    assert call(f"{url}/1", b"abc", method="PUT", headers={})[1]["field"] == "type"
    assert call(f"{url}/x", b"abc", method="PUT", headers=headers)[1]["field"] == "seq"
    code, answer = call(
        f"{url}/1", b"x" * (CHUNK_LIMIT + 1), method="PUT", headers=headers
    )
    assert (code, answer["field"]) == (413, "data")
    code, answer = call(f"{url}/2?type=video&total_seq=2", b"abc", method="PUT")
    assert code == 200, answer


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_request_limit_is_refused(small_chunk_gateway, chunked):
    """A body past the gateway's request limit (twice the chunk limit and a
    MiB) is answered 413 naming the request, with or without a length."""
    limit = CHUNK_LIMIT * 2 + 1024 * 1024
    body = b"x" * (limit + 1)
    connection = http.client.HTTPConnection(
        small_chunk_gateway.removeprefix("http://"), timeout=30
    )
    headers = {"Content-Type": wire.BUNDLE_CONTENT_TYPE}
    try:
        if chunked:
            pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
            connection.request(
                "POST", "/v1/chunks", pieces, headers, encode_chunked=True
            )
        else:
            connection.request("POST", "/v1/chunks", body, headers)
        answer = connection.getresponse()
        assert answer.status == 413
        assert json.loads(answer.read())["field"] == "$"
    finally:
        connection.close()


def test_health_and_ledger_after_bad_input(small_chunk_gateway):
    """After refusals the gateway is healthy and its ledger counts only
    accepted packets."""
    post_packets(small_chunk_gateway, [_good(file_id="l1", seq=3, total_seq=3)])
    post_packets(small_chunk_gateway, [_good(file_id="l1", seq=4, total_seq=3)])
    code, health = call(f"{small_chunk_gateway}/healthz")
    assert (code, health["broker"]) == (200, "up")
    code, ledger = call(f"{small_chunk_gateway}/v1/files/l1")
    assert code == 200
    assert (ledger["received"], ledger["missing"]) == (1, [[1, 2]])


def test_many_files_status_in_one_question(small_chunk_gateway):
    """POST /v1/files/status answers each named file: its ledger, or null."""
    post_packets(small_chunk_gateway, [_good(file_id="q1", seq=2)])
    post_packets(small_chunk_gateway, [_good(file_id="q2", seq=s) for s in (1, 2)])
    body = json.dumps({"file_ids": ["q1", "q2", "never-sent"]}).encode()
    code, answer = call(
        f"{small_chunk_gateway}/v1/files/status",
        body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    assert code == 200, answer
    files = answer["files"]
    assert (files["q1"]["received"], files["q1"]["missing"]) == (1, [[1, 1], [3, 4]])
    assert (files["q2"]["received"], files["q2"]["missing"]) == (2, [[3, 4]])
    assert files["never-sent"] is None
    assert files["q1"] == call(f"{small_chunk_gateway}/v1/files/q1")[1]


@pytest.mark.parametrize(
    ("body", "field", "names"),
    [
        (b"{oops", "$", "not valid JSON"),
        (b"[]", "file_ids", "non-empty list"),
        (b'{"file_ids": []}', "file_ids", "non-empty list"),
        (b'{"file_ids": ["ok", "../etc"]}', "file_ids", "entry 1"),
        (b'{"file_ids": ["ok", 7]}', "file_ids", "entry 1"),
        (json.dumps({"file_ids": ["f"] * 1001}).encode(), "file_ids", "1001 files"),
    ],
)
def test_bad_status_questions_are_400(small_chunk_gateway, body, field, names):
    """A status question that is not a list of file ids says what was wrong."""
    code, answer = call(
        f"{small_chunk_gateway}/v1/files/status",
        body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    assert (code, answer["field"]) == (400, field), answer
    assert names in answer["reason"]


def _frames(*packets):
    """A bundle body, as `datahaul send` frames a run of large chunks."""
    return wire.encode_bundle(
        [Packet(**{**p, "data": base64.b64decode(p["data"])}) for p in packets]
    )


def _post_chunks(base, body, content_type=wire.BUNDLE_CONTENT_TYPE):
    return call(
        f"{base}/v1/chunks", body, method="POST", headers={"Content-Type": content_type}
    )


def test_a_run_of_raw_chunks_is_accepted_in_one_request(small_chunk_gateway):
    """POST /v1/chunks takes framed chunks all or nothing and records each."""
    digest = hashlib.sha256(b"pixels").hexdigest()
    body = _frames(
        *(_good(file_id="run-1", seq=s, chunk_sha256=digest) for s in (1, 2))
    )
    code, answer = _post_chunks(small_chunk_gateway, body)
    assert (code, answer["accepted"], answer["published"]) == (200, 2, 2), answer
    ledger = call(f"{small_chunk_gateway}/v1/files/run-1")[1]
    assert (ledger["received"], ledger["missing"]) == (2, [[3, 4]])

    mixed = _frames(_good(file_id="run-2"), _good(file_id="run-3", type="video"))
    code, answer = _post_chunks(small_chunk_gateway, mixed)
    assert (code, answer["published"]) == (200, 2), answer


@pytest.mark.parametrize(
    ("body", "content_type", "field", "index"),
    [
        (
            _frames(_good(seq=1), _good(seq=2, chunk_sha256="0" * 64)),
            None,
            "chunk_sha256",
            1,
        ),
        (
            _frames(_good(seq=1), _good(seq=2, chunk_xxh128="0" * 32)),
            None,
            "chunk_xxh128",
            1,
        ),
        (_frames(_good(seq=1), _good(seq=9)), None, "seq", 1),
        (_frames(_good(seq=1))[:-2], None, "$", None),
        (b"", None, "$", None),
        (_frames(_good(seq=1)), "application/json", "$", None),
    ],
)
def test_bad_chunk_runs_are_refused_whole(
    small_chunk_gateway, body, content_type, field, index
):
    """A bad frame, a truncated body or the wrong content type is a 400 that
    names the field (and the frame); nothing of the run is accepted."""
    code, answer = _post_chunks(
        small_chunk_gateway, body, content_type or wire.BUNDLE_CONTENT_TYPE
    )
    assert (code, answer["field"], answer.get("index")) == (400, field, index), answer
    assert call(f"{small_chunk_gateway}/v1/files/pic-1")[0] == 404
