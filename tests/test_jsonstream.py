"""ArrayStream: a JSON array body fed in arbitrary chunks yields exactly its elements, or StreamError.

Every test runs both ways: plain (element by element) and fast (msgspec batches of CallFields,
handing over to the plain way where it must). The fast way yields structs where it could,
compared here through the fields the exporter reads, and each record decodes to the same
`Record` either way.
"""

from __future__ import annotations

import json
import random

import pytest

from exporter.jsonstream import MAX_PENDING_CHARS, ArrayStream, StreamError
from exporter.records import FIELDS, CallFields, decode_record

MODE = {"fast": False}


@pytest.fixture(autouse=True, params=["plain", "fast"])
def mode(request):
    MODE["fast"] = request.param == "fast"
    yield request.param
    MODE["fast"] = False


def new_stream() -> ArrayStream:
    return ArrayStream(CallFields) if MODE["fast"] else ArrayStream()


def view(item):
    """In fast mode, objects compare by the fields the exporter reads (None left out)."""
    if not MODE["fast"]:
        return item
    if isinstance(item, CallFields):
        return {k: getattr(item, k) for k in FIELDS if getattr(item, k) is not None}
    if isinstance(item, dict):
        return {k: item[k] for k in FIELDS if item.get(k) is not None}
    return item


# Element texts as the API would send them: raw UTF-8 (not \u escapes), numbers in several notations.
ELEMENT_TEXTS = [
    '{"id": "a", "status": "completed", "duration_seconds": 61, "prompt": "Réservez une table — merci ✓"}',
    '{"id": "b", "note": "clef 𝄞 and emoji 📞", "escaped": "quote \\" backslash \\\\ newline \\n", "u": "\\u00e9"}',
    "2.5",
    "-3e5",
    "0",
    "-0.125",
    "12345678901234567890",
    "1E-7",
    "true",
    "false",
    "null",
    '"a bare string with ] and , inside"',
    "[]",
    "{}",
    '[1, [2, [3, {"deep": [4.5, -6e-2]}]]]',
    '"ü"',
]
ELEMENTS = [json.loads(text) for text in ELEMENT_TEXTS]
BODY = (" \n[\n" + ",\n  ".join(ELEMENT_TEXTS) + "\n]\n").encode("utf-8")


def exactly(items: list) -> str:
    """repr tells True from 1 and 0 from 0.0, which == does not."""
    return repr([view(item) for item in items])


def decode(chunks) -> list:
    stream = new_stream()
    items = []
    for chunk in chunks:
        items.extend(stream.feed(chunk))
    items.extend(stream.finish())
    return items


def random_chunks(data: bytes, seed: int, largest: int) -> list[bytes]:
    rng = random.Random(seed)
    chunks, pos = [], 0
    while pos < len(data):
        size = rng.randint(1, largest)
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def test_body_holds_multibyte_characters_and_numbers_to_split():
    # guards the fixture: the splits below must be able to land inside these
    assert any(b >= 0xF0 for b in BODY)  # 4-byte UTF-8 sequences
    assert b"2.5" in BODY and b"-3e5" in BODY and b"1E-7" in BODY


def test_whole_body_in_one_chunk_yields_every_element():
    assert exactly(decode([BODY])) == exactly(ELEMENTS)


@pytest.mark.parametrize("seed", range(40))
def test_body_in_random_chunks_yields_every_element(seed):
    assert exactly(decode(random_chunks(BODY, seed, largest=1 + seed % 9))) == exactly(ELEMENTS)


def test_body_split_at_every_byte_yields_every_element():
    # every two-chunk split: inside each multi-byte character, number, literal and string
    for cut in range(len(BODY) + 1):
        assert exactly(decode([BODY[:cut], BODY[cut:]])) == exactly(ELEMENTS), cut


def test_body_fed_byte_by_byte_yields_every_element():
    assert exactly(decode([BODY[i : i + 1] for i in range(len(BODY))])) == exactly(ELEMENTS)


@pytest.mark.parametrize(
    "text, value", [("2.5", 2.5), ("-3e5", -300000.0), ("10", 10), ("-0.125", -0.125), ("1E+2", 100.0)]
)
def test_a_number_cut_anywhere_is_read_whole(text, value):
    body = f"[{text}]".encode()
    for cut in range(1, len(body)):
        assert exactly(decode([body[:cut], body[cut:]])) == exactly([value]), cut


def test_items_come_out_as_soon_as_they_are_complete(mode):
    if mode == "fast":
        pytest.skip("the fast way holds the last element back until the next separator or the end")
    stream = ArrayStream()
    assert stream.feed(b'[{"id": "a"}, {"id"') == [{"id": "a"}]
    assert stream.feed(b': "b"}, 7') == [{"id": "b"}]
    assert stream.feed(b"]") == [7]
    stream.finish()


@pytest.mark.parametrize("body", [b"[]", b" [ ] ", b"[\n]\n", b"\t[\r\n]"])
def test_empty_array_yields_nothing(body):  # noqa: D103
    assert decode([body]) == []
    assert decode([body[i : i + 1] for i in range(len(body))]) == []


@pytest.mark.parametrize(
    "chunks",
    [
        [b""],
        [b"["],
        [b"[1,"],
        [b'[{"id": "a"}, {"id"'],
        [b'[{"id": "a"}'],
        [b'["unterminated'],
        [b"[2.5"],
        [b"[tru"],
        [b'["caf\xc3'],  # cut inside a UTF-8 character
    ],
    ids=[
        "nothing",
        "open_bracket",
        "after_comma",
        "inside_object",
        "before_close",
        "inside_string",
        "number",
        "literal",
        "inside_character",
    ],
)
def test_truncated_body_is_an_error(chunks):
    with pytest.raises(StreamError):
        decode(chunks)


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"error": "unauthorized"}',
        b'"calls"',
        b"42",
        b"null",
    ],
)
def test_body_that_is_not_an_array_is_an_error(body):
    with pytest.raises(StreamError):
        stream = new_stream()
        stream.feed(body)
        stream.finish()


@pytest.mark.parametrize("body", [b"[1] x", b"[1][2]", b"[]]", b"[1],", b'[{"a": 1}]{"b": 2}', b"[]\n<html>"])
def test_data_after_the_array_is_an_error(body):
    with pytest.raises(StreamError):
        decode([body])


@pytest.mark.parametrize("body", [b"[1 2]", b'[{"a": 1} {"b": 2}]', b'["a" "b"]', b"[1;2]", b"[1,,2]", b"[,1]"])
def test_elements_not_separated_by_one_comma_are_an_error(body):
    with pytest.raises(StreamError):
        decode([body])


@pytest.mark.parametrize("body", [b'["\xff"]', b'[{"a": "\xc3\x28"}]', b'["\xed\xa0\x80"]', b"\xfe[]"])
def test_invalid_utf8_is_an_error(body):
    with pytest.raises(StreamError):
        decode([body])


def test_invalid_utf8_after_the_array_is_an_error():
    # the body ends inside a multi-byte sequence after `]`: bytes that are not text
    with pytest.raises(StreamError):
        decode([b"[1]\xe2\x82"])


def test_element_larger_than_the_pending_limit_is_an_error():
    stream = new_stream()
    stream.feed(b'[{"id": "a"}, {"transcript": "')
    chunk = b"x" * (64 * 1024)  # the client's read size
    with pytest.raises(StreamError):
        for _ in range(MAX_PENDING_CHARS // len(chunk) + 2):
            stream.feed(chunk)


def test_large_element_below_the_limit_is_read():
    transcript = "y" * (MAX_PENDING_CHARS // 4)
    body = json.dumps([{"id": "a", "transcript": transcript}, {"id": "b"}]).encode()
    chunks = [body[i : i + 64 * 1024] for i in range(0, len(body), 64 * 1024)]
    assert exactly(decode(chunks)) == exactly([{"id": "a", "transcript": transcript}, {"id": "b"}])


# --- the fast way on realistic records -----------------------------------------------------------


def call_record(i: int) -> dict:
    """A call as the API sends it, with the traps of a cut: `},{` inside strings and nested arrays."""
    return {
        "id": f"call-{i:05d}",
        "to_number": "+15550100",
        "status": ("completed", "failed", "ringing")[i % 3],
        "direction": "outbound",
        "prompt": 'Say "},{" and then [{"a": 1},{"b": 2}] — ünïcode',
        "context": {"items": [{"sku": 1}, {"sku": 2}], "note": '},{"id":'},
        "result": {"answers": [{"q": "x"}, {"q": "y"}]} if i % 2 else None,
        "created_at": f"2026-11-24T10:{i % 60:02d}:00Z",
        "updated_at": f"2026-11-24T11:{i % 60:02d}:00.{i % 1000:03d}Z",
        "started_at": None if i % 5 == 0 else "2026-11-24T10:00:02+00:00",
        "answered_at": None,
        "ended_at": "2026-11-24T10:01:00Z" if i % 3 != 2 else None,
        "duration_seconds": i % 90,
        "billed_duration_seconds": None,
        "billing_amount_milli_cents": i * 7,
        "reservation_status": "settled",
        "webhook_status": "pending",
        "result_status": None,
        "hangup_cause": "normal_clearing",
        "error_code": None,
        "metadata": {"campaign": "q4"},
        "newer_api_field": [{"x": {"y": [1, {"z": 2}]}}],
    }


RECORDS = [call_record(i) for i in range(300)]


@pytest.mark.parametrize("indent", [None, 2], ids=["compact", "pretty"])
@pytest.mark.parametrize("seed", range(6))
def test_records_decode_to_the_same_record_either_way(mode, indent, seed):
    body = json.dumps(RECORDS, indent=indent, ensure_ascii=False).encode()
    items = decode(random_chunks(body, seed, largest=4096 * (1 + seed)))
    assert [decode_record(item) for item in items] == [decode_record(r) for r in RECORDS]
    if mode == "fast":
        fast = sum(isinstance(item, CallFields) for item in items)
        assert fast >= len(RECORDS) // 2, f"only {fast} of {len(RECORDS)} records took the fast way"


def test_a_malformed_record_hands_the_rest_over_to_the_plain_way_and_loses_nothing(mode):
    records = [*RECORDS[:100], {**RECORDS[100], "updated_at": "yesterday"}, 42, *RECORDS[101:]]
    body = json.dumps(records).encode()
    items = decode([body[i : i + 8192] for i in range(0, len(body), 8192)])
    assert [decode_record(item) for item in items] == [decode_record(r) for r in records]
    assert decode_record(items[100]).reason == "bad_timestamp" and decode_record(items[101]).reason == "not_object"
