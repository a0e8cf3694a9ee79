"""The HTTP/1.1 wire: the client's response parser is as strict as h11 (RFC 9112 grammar).

(A) A differential property: hypothesis writes valid and invalid responses as raw bytes, a
    loopback server (``tests/rawserver.py``) sends each one to the client and closes, and h11
    (a dev-only reference, never a runtime dependency) reads the same bytes. Both must reach the
    same verdict, and when both accept, the same final status and the same body bytes.
(B) Explicit tests, one per behaviour, for framing and header rules, for what RFC 9112 asks
    beyond h11, for connection reuse, and for caller headers refused before any connection.

h11 0.16 verdicts the generator relies on (read in h11/_abnf.py, _readers.py, _headers.py,
_connection.py, _receivebuffer.py and pinned by ``test_h11_reference_verdicts`` below):

* bare LF ends the status line, header lines and the head, and the trailer section; a bare CR
  does not end a line (it makes the line invalid); chunk-size lines and the CRLF after chunk
  data must be CRLF;
* obs-fold continuation lines are joined with a space; a continuation line right after the
  status line is refused;
* ``Content-Length: 5, 5`` and repeated equal fields are accepted; different values, an empty
  value, a sign, non-ASCII digits and more than 20 digits are refused;
* ``Transfer-Encoding`` must be exactly ``chunked`` (case-insensitive, one field): ``gzip``,
  ``chunked, gzip``, ``gzip, chunked`` and a repeated field are refused; with both TE and CL the
  chunked coding frames the body (a malformed CL is refused even then);
* the status code is exactly three digits (``42`` and ``2000`` are refused); 1xx are interim and
  skipped, but ``101`` without a requested upgrade is refused, and codes below 100 are refused;
  the reason phrase may be missing;
* chunk size is 1 to 20 hex digits, then ``;`` + anything (extensions are not parsed), then
  optional trailing SP/HTAB: ``5f ``, ``5f;a=b`` are accepted, ``5f ;a=b``, ``0x5f``, ``+5f``,
  ``5_f``, `` 5f`` refused;
* trailer fields are parsed (and refused when malformed) like header fields;
* field values are ``[^\\x00\\s]`` runs separated by SP/HTAB: NUL, CR, VT, FF refused, other CTLs
  and obs-text accepted; names must be tokens, whitespace before the colon is refused.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from rawserver import RawConnection, RawServer, answer_once, keep_answering, raw_server

from spaps_client import (
    LoggingHooks,
    RetryClient,
    RetryConfig,
    SpapsConfigurationError,
    SpapsError,
    SpapsTimeoutError,
    SpapsTransportError,
)

try:  # the reference parser: a dev-only dependency (it comes with httpx), never a runtime one
    import h11
except ImportError:  # pragma: no cover - only without the dev extras
    h11 = None

needs_h11 = pytest.mark.skipif(h11 is None, reason="h11 (dev extras, via httpx) is missing")

NO_RETRY = RetryConfig(max_attempts=1)
OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
MAX_BODY = 16 * 1024 * 1024  # the client's body limit

Verdict = Optional[Tuple[int, bytes]]  # (final status, body) when accepted, None when refused


# =============================================================================================
# Reading a response through the public API (today's request() returns .status/.body)
# =============================================================================================


def _status(response: Any) -> int:
    status = getattr(response, "status_code", None)
    return int(status if status is not None else response.status)


def _body(response: Any) -> Optional[bytes]:
    if hasattr(response, "content"):
        return response.content  # type: ignore[no-any-return]
    return response.body  # type: ignore[no-any-return]


def _client(url: str, **kwargs: Any) -> RetryClient:
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("retry_config", NO_RETRY)
    return RetryClient(base_url=url, **kwargs)


@pytest.fixture
def make_client() -> Iterator[Callable[..., RetryClient]]:
    """``make_client(url, **kwargs)``: RetryClients closed at teardown."""
    made: List[RetryClient] = []

    def make(url: str, **kwargs: Any) -> RetryClient:
        client = _client(url, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _refused(call: Callable[[], Any]) -> SpapsTransportError:
    """Run ``call``; it must fail with a SpapsTransportError that is not a timeout."""
    with pytest.raises(SpapsTransportError) as caught:
        call()
    assert not isinstance(caught.value, SpapsTimeoutError), (
        f"the client waited for bytes that never came instead of refusing: {caught.value!r}")
    return caught.value


def _refused_once(make_client: Callable[..., RetryClient], raw: bytes,
                  target: str) -> SpapsTransportError:
    """A server answering ``raw`` once: GET ``target`` must be refused (see ``_refused``)."""
    with raw_server(answer_once(raw)) as server:
        client = make_client(server.url)
        return _refused(lambda: client.request("GET", target))


# =============================================================================================
# The reference: what h11 makes of a response
# =============================================================================================


def h11_verdict(raw: bytes) -> Verdict:
    """h11's reading of ``raw`` as the answer to ``GET /``, the stream ending after it."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")  # EOF: ends a close-delimited body, leaves others incomplete
    status: Optional[int] = None
    body = b""
    try:
        while True:
            item = conn.next_event()
            if item is h11.NEED_DATA or isinstance(item, h11.ConnectionClosed):
                return None  # incomplete
            if isinstance(item, h11.Response):
                status = item.status_code
            elif isinstance(item, h11.Data):
                body += bytes(item.data)
            elif isinstance(item, h11.EndOfMessage):
                assert status is not None
                return status, body
    except h11.RemoteProtocolError:
        return None


def client_verdict(server: RawServer, payload: List[bytes], raw: bytes) -> Verdict:
    """Our client's reading of ``raw`` served over loopback (the server closes after it)."""
    payload[0] = raw
    with contextlib.closing(_client(server.url)) as client:
        try:
            response = client.request("GET", "/wire")
        except SpapsTimeoutError as exc:  # the server closed: nothing should be waited for
            raise AssertionError(f"timed out on a response followed by EOF: {exc!r}") from exc
        except SpapsTransportError:
            return None
    body = _body(response)
    if body is None:  # over the client's body limit: reported, not accepted
        return None
    return _status(response), body


# =============================================================================================
# (A) The generator
# =============================================================================================
#
# Regions left out of the differential generator, each for an RFC reason; the ones where the
# RFC asks more than h11 does have an explicit test in part (B):
#
# X1 Transfer-Encoding in an HTTP/1.0 message. RFC 9112 §6.1: a client that receives it "MUST
#    treat the message as if the framing is faulty, even if a Content-Length is present, and
#    close the connection"; h11 frames it by chunked.
#    -> test_transfer_encoding_on_an_http10_response_is_faulty_framing
# X2 HTTP major versions other than 1 (``HTTP/0.9``, ``HTTP/2.0``). RFC 9112 §2.3/§2.5 define
#    this syntax for HTTP/1.x only; h11 accepts any ``DIGIT.DIGIT``. (Minor versions 1.2-1.9
#    are generated: §2.5 says to process them as 1.1, which is what h11 does.)
# X3 Status codes 600-999. RFC 9110 §15: valid codes are 100-599; h11 accepts up to 999.
# X4 Control characters other than HTAB, CR, LF and NUL in field values and the reason phrase.
#    RFC 9110 §5.5 lets a recipient retain or replace them ("MAY"); h11 refuses VT and FF but
#    accepts \x01-\x08, \x0e-\x1f and DEL (an artefact of Python's ``\s``). CR, LF and NUL,
#    which the RFC forbids outright, are generated.
# X5 Chunk extensions other than well-formed ``;name[=token|quoted-string]`` without
#    whitespace before ``;``. RFC 9112 §7.1.1 allows BWS around ``;`` and ``=`` (h11 refuses
#    ``5 ;a``), and h11 does not parse extensions at all (it accepts ``5;``, ``5;=x``, NUL).
# X6 Numerals padded past 20 digits (chunk size, Content-Length). RFC 9112 §7.1 and RFC 9110
#    §8.6 set no digit limit ("anticipate potentially large numerals"); h11 refuses more than
#    20 digits even for ``000...05``. Huge values with many significant digits are generated:
#    both sides refuse them (the client's 16 MiB body limit; a reported over-limit body counts
#    as a refusal).
# X7 Content-Length / Transfer-Encoding in 1xx, 204 and 304 responses and in trailers. RFC 9112
#    §6.3 item 1: these messages have no content whatever their framing fields say; RFC 9110
#    §6.5.1: framing fields are not allowed in trailers. h11 still validates those fields.
# X8 Heads above 16 KiB (h11's default max_incomplete_event_size; RFC 9112 §2.3 leaves the
#    limit to the recipient) and complete bodies above the client's 16 MiB limit.


def _rarely(draw: Any, odds: int) -> bool:
    """True about one time in ``odds``; shrinks to False.

    (The True sits mid-list: hypothesis favours the ends of a range.)
    """
    half = [False] * (odds // 2)
    return bool(draw(st.sampled_from([*half, True, *half[: odds - 1 - len(half)]])))


def _one_of(draw: Any, common: Sequence[Any], rare: Sequence[Any] = (), odds: int = 5) -> Any:
    """Usually one of ``common``; one time in ``odds`` one of ``rare`` (shrinks to common)."""
    if rare and _rarely(draw, odds):
        return draw(st.sampled_from(list(rare)))
    return draw(st.sampled_from(list(common)))


GOOD_VERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 3 + [b"HTTP/1.2", b"HTTP/1.9"]
BAD_VERSIONS = [
    b"HTTP/1.10", b"HTTP/11", b"HTTP/1", b"http/1.1", b"HTTP/1.1x", b"HTTP /1.1", b"HTTP/1.x",
    b"HTP/1.1", b"", b" HTTP/1.1", b"HTTP/1.\xef\xbc\x91", b"HTTP/1.\xb9", b"HTTP/1.1\x00",
]
GOOD_SEPARATORS = [b" "]
BAD_SEPARATORS = [b"  ", b"\t", b"", b"\xa0", b"\x85"]
FINAL_STATUSES = [200, 200, 201, 204, 206, 299, 301, 304, 400, 404, 418, 429, 500, 503, 599]
INTERIM_STATUSES = [100, 100, 102, 103, 150, 199]
BAD_STATUSES = [
    b"099", b"000", b"042", b"42", b"9", b"2000", b"20", b"2 00", b"+20", b"-20", b"20a",
    b"1e2", b"\xef\xbc\x9200",  # fullwidth 2 (UTF-8), then 00
    b"\xb200",  # latin-1 superscript two: str.isdigit() says yes, int() says no
    b"\xd9\xa2\xd9\xa0\xd9\xa0",  # Arabic-Indic 200 (UTF-8)
    b"101", b"100", b"103",  # interim codes as the last message: never completed
]
GOOD_REASONS = [b" OK", b" OK", b" Not Found", b"", b" ", b"  OK", b" a\tb", b" caf\xe9",
                b" x y  z", b" \xa0\x85"]
BAD_REASONS = [b" a\x00b", b" a\rb", b"\tOK"]
EOLS = [b"\r\n"] * 7 + [b"\n"] * 2
BAD_EOLS = [b"\r", b"\r\r\n"]
NAMES = [b"X-Test", b"Server", b"X-Request-Id", b"Set-Cookie", b"Cache-Control", b"Link",
         b"A!#$%&'*+-.^_`|~z", b"x", b"Connection"]
BAD_NAMES = [b"", b"X Test", b"X@Y", b"X(Y)", b"X\xe9", b"X\x00", b"X-Test ", b"X-Test\t",
             b"[x]", b"X\x01", b"\xef\xbc\xa1", b"X\"Y"]
OWS = [b"", b" ", b"\t", b"  "]
VALUE_BYTES = [bytes([c]) for c in b"abcXYZ019-_.,;:=/\"'()<>?@[]{}~!*"] + [
    b" ", b" ", b"\t", b"\x80", b"\xa0", b"\x85", b"\xe9", b"\xff"]
BAD_VALUE_BYTES = [b"\x00", b"\r", b"\n"]
FOLD_LEADS = [b" ", b"\t", b"  ", b" \t"]


@st.composite
def field_values(draw: Any) -> bytes:
    value = b"".join(draw(st.lists(st.sampled_from(VALUE_BYTES), max_size=10)))
    if _rarely(draw, 15):  # a byte the RFC forbids, somewhere
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(st.sampled_from(BAD_VALUE_BYTES)) + value[at:]
    return value


@st.composite
def field_lines(draw: Any, names: List[bytes], eol: bytes) -> bytes:
    """One field line (possibly obs-folded over several lines), with its line ending."""
    name = _one_of(draw, names, BAD_NAMES, odds=15)
    line = (name + b":" + _one_of(draw, [b"", b" "], OWS[2:]) + draw(field_values())
            + _one_of(draw, [b""], OWS))
    if _rarely(draw, 8):  # obs-fold (RFC 9112 §5.2)
        line += eol + draw(st.sampled_from(FOLD_LEADS)) + draw(field_values())
    return line + eol


def _digits(text: str, zero: int) -> bytes:
    return "".join(chr(zero + int(digit)) for digit in text).encode("utf-8")


@st.composite
def content_length_fields(draw: Any, n: int, eol: bytes) -> List[bytes]:
    """Content-Length field lines for a body of ``n`` bytes: right, odd or wrong."""
    good = [str(n).encode()]
    rare = [
        f"{n}, {n}".encode(), f"{n},{n}".encode(), f"0{n}".encode(), f"000{n}".encode(),
        f"+{n}".encode(), f"{n + 1}".encode(), f"{n + 7}".encode(),
        f"{max(n - 1, 0)}".encode(), f"{n // 2}".encode(),  # shorter: the rest is extra bytes
        _digits(str(n), 0xFF10), _digits(str(n), 0x0660), b"\xb2", f"{n}\xa0".encode("latin-1"),
        f"0x{n:x}".encode(), b"-1", b"", b"1e1", f"{n}, {n + 1}".encode(), f"{n},".encode(),
        f"{n} {n}".encode(), b"99999999999999999999", b"1" + b"0" * 20,
        b"18446744073709551616", b"SAME", b"OTHER",
    ]
    value = _one_of(draw, good, rare, odds=3)
    name = draw(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"]))
    ows = draw(st.sampled_from([b" ", b" ", b"", b"  "]))
    if value == b"SAME":  # the field twice, equal
        return [name + b": " + str(n).encode() + eol] * 2
    if value == b"OTHER":  # the field twice, different
        return [name + b": " + str(n).encode() + eol, name + b": " + str(n + 1).encode() + eol]
    return [name + b":" + ows + value + eol]


@st.composite
def transfer_encoding_fields(draw: Any, eol: bytes) -> List[bytes]:
    good = [b"chunked"]
    rare = [b"Chunked", b"CHUNKED", b" chunked ", b"gzip", b"chunked, gzip", b"gzip, chunked",
            b"identity", b"chunked, chunked", b"chunked,", b"chunkedx", b"deflate", b"TWICE"]
    value = _one_of(draw, good, rare, odds=4)
    if value == b"TWICE":
        return [b"Transfer-Encoding: chunked" + eol] * 2
    return [b"Transfer-Encoding: " + value + eol]


CHUNK_EXTENSIONS = [b";a", b";a=b", b';a="q q"', b";a=b;c", b";ext-1=x%20y"]
BAD_CHUNK_SIZES = ["0x{}", "+{}", "{}_", "_{}", " {}", "-{}", "", "{}g", "g{}", "{}\x00"]


@st.composite
def chunk_size_lines(draw: Any, size: int) -> bytes:
    digits = f"{size:x}" if draw(st.booleans()) else f"{size:X}"
    digits = b"0" * draw(st.integers(0, 2)) + digits.encode()
    if _rarely(draw, 20):
        pattern = draw(st.sampled_from(BAD_CHUNK_SIZES))
        if pattern == "{}_" and len(digits) > 1:
            digits = digits[:1] + b"_" + digits[1:]
        else:
            digits = pattern.format(digits.decode()).encode("latin-1")
    elif _rarely(draw, 30):
        digits = _digits(f"{size:d}"[:1] or "0", 0xFF10)
    ext = _one_of(draw, [b""], CHUNK_EXTENSIONS, odds=4)
    ows = _one_of(draw, [b""], [b" ", b"\t", b" \t"], odds=6)
    # A bare CR after an extension would read as part of it, a malformed extension (X5).
    eol = _one_of(draw, [b"\r\n"], [b"\n"] if ext else [b"\n", b"\r"], odds=12)
    return digits + ext + ows + eol


@st.composite
def chunked_bodies(draw: Any, body: bytes, trailer_eol: bytes) -> bytes:
    cuts = sorted(draw(st.lists(st.integers(1, max(len(body) - 1, 1)), max_size=3, unique=True)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if body[a:b]]
    out = b""
    for piece in pieces:
        size = len(piece)
        if _rarely(draw, 15):  # a lie about the size
            size = draw(st.sampled_from([size + 1, max(size - 1, 1), 0xFFFFFFFFFFFFFFFF]))
        out += draw(chunk_size_lines(size)) + piece
        out += _one_of(draw, [b"\r\n"], [b"\n", b"", b"XX", b"\r"], odds=12)
    out += draw(chunk_size_lines(0))
    for _ in range(draw(st.integers(0, 2))):  # trailer fields (no framing fields: X7)
        out += draw(field_lines(NAMES, trailer_eol))
    return out + trailer_eol


def _no_content_status(status: bytes) -> bool:
    return status.isdigit() and len(status) == 3 and (
        status.startswith(b"1") or status in (b"204", b"304"))


@st.composite
def interim_responses(draw: Any) -> bytes:
    eol = draw(st.sampled_from(EOLS))
    version = _one_of(draw, GOOD_VERSIONS, BAD_VERSIONS, odds=25)
    status = b"%d" % _one_of(draw, INTERIM_STATUSES, [101], odds=6)
    head = version + b" " + status + _one_of(draw, [b" Continue", b" Early Hints", b""])
    head += eol
    for _ in range(draw(st.integers(0, 2))):  # no framing fields (X7)
        head += draw(field_lines([b"Link", b"X-Hint", b"Server"], eol))
    return head + eol


@st.composite
def responses(draw: Any) -> bytes:
    """One raw HTTP/1.x response as a server might send it, possibly broken somewhere."""
    eol = draw(st.sampled_from(EOLS))
    line_eol = _one_of(draw, [eol], BAD_EOLS, odds=25)
    version = _one_of(draw, GOOD_VERSIONS, BAD_VERSIONS, odds=20)
    status = _one_of(draw, [b"%03d" % code for code in FINAL_STATUSES], BAD_STATUSES, odds=15)
    status_line = (version + _one_of(draw, GOOD_SEPARATORS, BAD_SEPARATORS, odds=25) + status
                   + _one_of(draw, GOOD_REASONS, BAD_REASONS, odds=25))
    big = _rarely(draw, 20)
    body = b"z" * 70000 if big else draw(st.binary(max_size=40))
    fields = [draw(field_lines(NAMES, eol)) for _ in range(draw(st.integers(0, 3)))]
    if _rarely(draw, 5):
        fields.append(b"Connection: " + draw(st.sampled_from([b"close", b"keep-alive",
                                                                b"Keep-Alive, x"])) + eol)
    framing = "close" if _no_content_status(status) else draw(
        st.sampled_from(["length", "length", "chunked", "chunked", "close", "both"]))
    if version == b"HTTP/1.0" and framing in ("chunked", "both"):
        framing = "length"  # X1: TE in HTTP/1.0 is covered by an explicit test
    framing_fields: List[bytes] = []
    if framing in ("length", "both"):
        framing_fields += draw(content_length_fields(len(body), eol))
    if framing in ("chunked", "both"):
        framing_fields += draw(transfer_encoding_fields(eol))
    for line in framing_fields:
        fields.insert(draw(st.integers(0, len(fields))), line)
    if fields and _rarely(draw, 20):  # the first field line starts with whitespace
        fields[0] = draw(st.sampled_from([b" ", b"\t"])) + fields[0]
    raw = _one_of(draw, [b""], [b"\r\n", b"\n", b" "], odds=25)
    for _ in range(_one_of(draw, [0], [1, 1, 2], odds=5)):
        raw += draw(interim_responses())
    raw += status_line + line_eol + b"".join(fields) + eol
    if framing in ("chunked", "both"):
        raw += draw(chunked_bodies(body, draw(st.sampled_from(EOLS))))
    else:
        raw += body
    if _rarely(draw, 10):  # bytes after the message: ignored when it is framed
        raw += draw(st.sampled_from([b"JUNK", b"\r\n", OK_2]))
    if _rarely(draw, 12):  # the connection drops early
        raw = raw[:draw(st.integers(0, max(len(raw) - 1, 0)))]
    return raw


# =============================================================================================
# (A) The differential property
# =============================================================================================


@pytest.fixture(scope="module")
def wire_server() -> Iterator[Tuple[RawServer, List[bytes]]]:
    """A raw server answering each connection with ``payload[0]``, then closing."""
    payload = [OK_2]

    def handler(conn: RawConnection, index: int) -> None:
        if conn.read_head() is not None:
            conn.send(payload[0])
        conn.finish()

    with raw_server(handler) as server:
        yield server, payload


DIFFERENTIAL = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                        report_multiple_bugs=False,
                        suppress_health_check=[HealthCheck.too_slow,
                                               HealthCheck.data_too_large,
                                               HealthCheck.function_scoped_fixture])

KNOWN = [  # always run first: one example per tricky region
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nX: a\r\n  b\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    b"\r\nok",
    b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nok\r\n0\r\nX-T: 1\n\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5_f\r\n" + b"y" * 95 + b"\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\n\r\nclose-delimited",
]


@needs_h11
def test_client_and_h11_agree_on_every_response(
        wire_server: Tuple[RawServer, List[bytes]]) -> None:
    server, payload = wire_server
    verdicts: List[bool] = []

    @DIFFERENTIAL
    @given(raw=responses())
    def agree(raw: bytes) -> None:
        expected = h11_verdict(raw)
        event("h11 accepts" if expected is not None else "h11 refuses")
        got = client_verdict(server, payload, raw)
        verdicts.append(expected is not None)
        assert got == expected, (
            f"client {'accepted ' + repr(got) if got else 'refused'}, h11 "
            f"{'accepted ' + repr(expected) if expected else 'refused'}: {raw!r}")

    for raw in KNOWN:
        agree = example(raw=raw)(agree)
    agree()
    # The generator must exercise both sides of the verdict, not just one.
    accepted = sum(verdicts)
    assert len(verdicts) >= 100
    assert 0.25 * len(verdicts) <= accepted <= 0.75 * len(verdicts), (accepted, len(verdicts))


@pytest.mark.parametrize(("raw", "expected"), [
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", (200, b"ok")),  # bare LF
    (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok", (200, b"ok")),  # obs-fold
    (b"HTTP/1.1 200 OK\r\n X: a\r\nContent-Length: 2\r\n\r\nok", None),  # leading whitespace
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", (200, b"ok")),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", (200, b"ok")),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", None),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"
     b"2\r\nok\r\n0\r\n\r\n", (200, b"ok")),  # TE + CL: chunked wins
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1e1\r\n\r\n"
     b"2\r\nok\r\n0\r\n\r\n", None),  # ... but a malformed CL is refused all the same
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\n\r\n", None),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", None),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
     None),
    (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", None),
    (b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok", None),
    (b"HTTP/1.1 100 Continue\r\n\r\n" + OK_2, (200, b"ok")),
    ("HTTP/1.1 200 OK\r\nContent-Length: \uff12\r\n\r\nok".encode(), None),
    (b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", (200, b"ok")),  # no reason phrase
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a=b\r\nok\r\n0\r\n\r\n",
     (200, b"ok")),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \t\r\nok\r\n0\r\n\r\n",
     (200, b"ok")),  # trailing whitespace after the chunk size
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 ;a=b\r\nok\r\n0\r\n\r\n", None),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n", None),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
     (200, b"ok")),  # trailer
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX T: 1\r\n\r\n",
     None),  # malformed trailer
    (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     (200, b"ok")),  # X1: h11 frames it; RFC 9112 §6.1 says faulty
])
@needs_h11
def test_h11_reference_verdicts(raw: bytes, expected: Verdict) -> None:
    """Pins the h11 behaviour the generator and the explicit tests were written against."""
    assert h11_verdict(raw) == expected


# =============================================================================================
# (B) Explicit tests
# =============================================================================================


# --- framing --------------------------------------------------------------------------------

CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"


def test_chunked_framing_wins_over_content_length_and_the_connection_is_not_reused(
        make_client: Callable[..., RetryClient]) -> None:
    """RFC 9112 §6.3 item 3: TE overrides CL, and such a message is a smuggling sign."""
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
              + CHUNKED_HELLO)
    with raw_server(keep_answering(lambda index: answer)) as server:
        client = make_client(server.url)
        for _ in range(2):
            response = client.request("GET", "/framing")
            assert (_status(response), _body(response)) == (200, b"hello")
        assert server.settle() == 2


@pytest.mark.parametrize("length", [None, b"15"], ids=["chunked", "chunked-and-content-length"])
def test_transfer_encoding_on_an_http10_response_is_faulty_framing(
        make_client: Callable[..., RetryClient], length: Optional[bytes]) -> None:
    """RFC 9112 §6.1: faulty framing even if a Content-Length is present; close the conn."""
    bad = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n"
    if length is not None:
        bad += b"Content-Length: " + length + b"\r\n"
    bad += b"\r\n" + CHUNKED_HELLO
    with raw_server(keep_answering(lambda index: bad if index == 0 else OK_2)) as server:
        client = make_client(server.url)
        _refused(lambda: client.request("GET", "/old"))
        response = client.request("GET", "/again")
        assert (_status(response), _body(response)) == (200, b"ok")
        assert server.settle() == 2


@pytest.mark.parametrize("coding", [b"gzip", b"chunked, gzip", b"gzip, chunked"])
def test_unknown_transfer_coding_is_refused_and_never_framed_by_content_length(
        make_client: Callable[..., RetryClient], coding: bytes) -> None:
    """RFC 9112 §6.3 item 4; the client knows only chunked (h11 refuses the rest too).

    The body is a complete chunked body of exactly Content-Length bytes, so a client that framed
    it by either header would return something; the connection is held open afterwards.
    """
    bad = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\nContent-Length: "
           + str(len(CHUNKED_HELLO)).encode() + b"\r\n\r\n" + CHUNKED_HELLO)
    with raw_server(keep_answering(lambda index: bad if index == 0 else OK_2)) as server:
        client = make_client(server.url)
        _refused(lambda: client.request("GET", "/coded"))
        response = client.request("GET", "/again")
        assert _body(response) == b"ok"
        assert server.settle() == 2


# --- field syntax ---------------------------------------------------------------------------


def test_whitespace_before_the_colon_is_refused(
        make_client: Callable[..., RetryClient]) -> None:
    """RFC 9112 §5.1 allows no whitespace there (servers MUST reject it); h11 refuses it."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello"
    _refused_once(make_client, raw, "/colon")


def test_a_first_header_line_starting_with_whitespace_is_refused(
        make_client: Callable[..., RetryClient]) -> None:
    """RFC 9112 §2.2: reject the message or ignore such lines; h11 rejects, and so do we."""
    raw = b"HTTP/1.1 200 OK\r\n X-Folded: yes\r\nContent-Length: 2\r\n\r\nok"
    _refused_once(make_client, raw, "/lead")


@pytest.mark.parametrize("value", [b"abc\x00def", b"abc\rdef", b"abc\ndef"],
                         ids=["NUL", "CR", "LF"])
def test_control_characters_in_a_received_header_value_are_refused(
        make_client: Callable[..., RetryClient], value: bytes) -> None:
    """RFC 9110 §5.5: CR, LF, NUL are invalid in a field value; they reach no one."""
    raw = b"HTTP/1.1 200 OK\r\nX-Request-Id: " + value + b"\r\nContent-Length: 2\r\n\r\nok"
    seen: List[str] = []
    hooks = LoggingHooks(
        on_response=lambda req, resp, elapsed, attempt: seen.extend(resp.headers.values()),
        on_error=lambda req, exc, attempt: seen.extend(
            [str(exc), str(getattr(exc, "request_id", None) or "")]),
    )
    with raw_server(answer_once(raw)) as server:
        client = make_client(server.url, logging_hooks=hooks)
        error = _refused(lambda: client.request("GET", "/ctl"))
    seen += [str(error), repr(error), str(error.request_id or "")]
    assert not any(bad in text for text in seen for bad in ("\x00", "\r", "\n")), seen


# --- chunk sizes ----------------------------------------------------------------------------

BODY_5F = bytes(range(32, 127))  # 0x5f bytes


@pytest.mark.parametrize("size", [b"0x5f", b"+5f", b"5_f", b" 5f", b"-5f"])
def test_malformed_chunk_size_is_refused(make_client: Callable[..., RetryClient],
                                         size: bytes) -> None:
    """RFC 9112 §7.1: chunk-size = 1*HEXDIG (int(x, 16) accepts all of these)."""
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + BODY_5F
           + b"\r\n0\r\n\r\n")
    _refused_once(make_client, raw, "/chunks")


@pytest.mark.parametrize("size", [b"5f ", b"5f\t", b"5f;name=value", b'5F;a="b c"', b"005f"])
def test_chunk_size_with_trailing_whitespace_or_extension_is_accepted_as_h11_does(
        make_client: Callable[..., RetryClient], size: bytes) -> None:
    """h11 tolerates SP/HTAB after the size (servers in the wild send it) and chunk-ext.

    (RFC 9112 §7.1 has no whitespace there; aligning with h11 is the rule of this file.)
    """
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + BODY_5F
           + b"\r\n0\r\n\r\n")
    with raw_server(answer_once(raw)) as server:
        response = make_client(server.url).request("GET", "/chunks")
        assert _body(response) == BODY_5F


# --- status line ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    "HTTP/1.1 \uff1200 OK\r\nContent-Length: 2\r\n\r\nok".encode(),
    b"HTTP/1.1 \xb200 OK\r\nContent-Length: 2\r\n\r\nok",  # latin-1 superscript two
    "HTTP/1.1 \u0662\u0660\u0660 OK\r\nContent-Length: 2\r\n\r\nok".encode(),
    "HTTP/1.1 200 OK\r\nContent-Length: \uff15\r\n\r\nhello".encode(),
    "HTTP/1.1 200 OK\r\nContent-Length: \u0663\r\n\r\nabc".encode(),
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok",
], ids=["status-fullwidth", "status-superscript", "status-arabic", "length-fullwidth",
        "length-arabic", "length-superscript"])
def test_unicode_digits_in_status_or_content_length_are_a_transport_error(
        make_client: Callable[..., RetryClient], raw: bytes) -> None:
    """RFC 9110 §15 / §8.6: status-code = 3DIGIT, Content-Length = 1*DIGIT (ASCII only)."""
    _refused_once(make_client, raw, "/digits")  # never a bare ValueError


@pytest.mark.parametrize("status", [b"099", b"42", b"000", b"9"])
def test_status_below_100_is_a_transport_error(make_client: Callable[..., RetryClient],
                                               status: bytes) -> None:
    raw = b"HTTP/1.1 " + status + b" X\r\nContent-Length: 2\r\n\r\nok"
    _refused_once(make_client, raw, "/low")


def test_unrequested_101_switching_protocols_is_refused(
        make_client: Callable[..., RetryClient]) -> None:
    """RFC 9110 §15.2.2: 101 only answers an Upgrade request; the client never sends one."""
    raw = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"\r\n" + OK_2)
    _refused_once(make_client, raw, "/upgrade")


def test_interim_100_and_103_responses_are_skipped(
        make_client: Callable[..., RetryClient]) -> None:
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + OK_2)
    with raw_server(answer_once(raw)) as server:
        response = make_client(server.url).request("GET", "/interim")
        assert (_status(response), _body(response)) == (200, b"ok")


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",
], ids=["bare-LF", "mixed"])
def test_bare_lf_line_endings_are_answered_without_waiting(
        make_client: Callable[..., RetryClient], raw: bytes) -> None:
    """RFC 9112 §2.2: a recipient MAY take LF as a line end; h11 does, and so must we.

    The server holds the connection open: a client still looking for CRLF CRLF would wait for
    its timeout instead of answering.
    """
    with raw_server(answer_once(raw, hold=True)) as server:
        client = make_client(server.url, timeout=5)
        try:
            response = client.request("GET", "/lf")
        except SpapsTimeoutError as exc:
            pytest.fail(f"the client waited for CRLF after a bare-LF head: {exc!r}")
        assert (_status(response), _body(response)) == (200, b"ok")


# --- what the caller sends ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [
    ("Content-Length", "5"), ("content-length", "0"), ("Host", "evil.example"),
    ("HOST", "x"), ("Transfer-Encoding", "chunked"),
])
def test_caller_supplied_framing_or_host_header_is_refused_before_connecting(
        make_client: Callable[..., RetryClient], name: str, value: str) -> None:
    """The client frames and addresses requests itself; a caller's copy would contradict it."""
    with raw_server(keep_answering(lambda index: OK_2)) as server:
        client = make_client(server.url)
        with pytest.raises(SpapsConfigurationError) as caught:
            client.request("GET", "/headers", headers={name: value})
        assert isinstance(caught.value, ValueError)
        assert server.settle() == 0


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b"],
                         ids=["CRLF", "LF", "CR", "NUL"])
def test_caller_header_value_with_line_break_is_refused_before_connecting(
        make_client: Callable[..., RetryClient], value: str) -> None:
    with raw_server(keep_answering(lambda index: OK_2)) as server:
        client = make_client(server.url)
        with pytest.raises(SpapsConfigurationError):
            client.request("GET", "/inject", headers={"X-Note": value})
        assert server.settle() == 0


# --- proxies --------------------------------------------------------------------------------


def test_refused_connect_through_https_proxy_is_not_retried(
        monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., RetryClient]) -> None:
    refusal = (b"HTTP/1.1 407 Proxy Authentication Required\r\n"
               b"Proxy-Authenticate: Basic realm=\"proxy\"\r\nContent-Length: 0\r\n\r\n")
    with raw_server(answer_once(refusal)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "")
        client = make_client("https://spaps.invalid:443",
                             retry_config=RetryConfig(max_attempts=3, backoff_factor=0))
        with pytest.raises(SpapsTransportError) as caught:
            client.request("GET", "/health")
        proxy.settle()
        connects = [head for head in proxy.heads() if head.startswith(b"CONNECT ")]
    assert [head.split(b"\r\n")[0] for head in connects] == [
        b"CONNECT spaps.invalid:443 HTTP/1.1"]
    assert caught.value.retryable is False


# --- close-delimited bodies -----------------------------------------------------------------


def test_close_delimited_body_of_4_mib_arrives_intact(
        make_client: Callable[..., RetryClient]) -> None:
    body = os.urandom(4 * 1024 * 1024)
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body
    with raw_server(answer_once(raw)) as server:
        response = make_client(server.url).request("GET", "/big")
        assert _status(response) == 200
        assert _body(response) == body


def test_close_delimited_body_over_the_limit_is_reported_not_read_forever(
        make_client: Callable[..., RetryClient]) -> None:
    """The server streams until the client hangs up (capped at 4 x the client's limit)."""
    sent = [0]

    def stream(conn: RawConnection, index: int) -> None:
        if conn.read_head() is None:
            return
        block = b"x" * (1024 * 1024)
        if conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"):
            while sent[0] < 4 * MAX_BODY and conn.send(block):
                sent[0] += len(block)
        conn.finish()

    with raw_server(stream) as server:
        client = make_client(server.url, timeout=10)
        try:
            response = client.request("GET", "/endless")
        except SpapsTimeoutError as exc:
            pytest.fail(f"the client kept reading past its body limit: {exc!r}")
        except SpapsError:
            pass  # a clear error for a body over the limit
        else:
            assert _body(response) is None, "an over-limit body must not be returned cut short"
    assert sent[0] < 4 * MAX_BODY, "the client read far beyond its 16 MiB limit"


# --- keep-alive -----------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(make_client: Callable[..., RetryClient]) -> None:
    with raw_server(keep_answering(lambda index: OK_2)) as server:
        client = make_client(server.url)
        for _ in range(2):
            assert _body(client.request("GET", "/ka")) == b"ok"
        assert server.settle() == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
], ids=["connection-close", "http10-without-keep-alive"])
def test_connection_close_response_makes_the_next_call_reconnect(
        make_client: Callable[..., RetryClient], answer: bytes) -> None:
    """The server would answer again on the same connection; the client must not ask it to."""
    with raw_server(keep_answering(lambda index: answer)) as server:
        client = make_client(server.url)
        for _ in range(2):
            assert _body(client.request("GET", "/close")) == b"ok"
        assert server.settle() == 2
