"""Tests for minipub, in the same sections as the module.

Unit tests call the parser and the WSGI application directly; integration
tests start a real minipub.Server on port 0 and talk to it over sockets.
Every test is bounded in time; none sleeps a fixed time.
"""
import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import wsgiref.util
import wsgiref.validate

import pytest

import minipub

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# helpers shared by every section
# ---------------------------------------------------------------------------

@pytest.fixture
def serve():
    """serve(app, **options) -> a started Server on a free port; stopped after the test."""
    servers = []

    def start(app, **options):
        server = minipub.Server(app, "127.0.0.1", 0, **options).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop(10)


def hello_app(environ, start_response):
    body = b"hello " + environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


def exchange(port, data, timeout=5.0, until_close=True):
    """Send raw bytes; return everything received until the peer closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not until_close and b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def responses(raw):
    """Split raw bytes into [(status, headers dict lower-case, body)] (Content-Length/chunked)."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, raw = raw[:n], raw[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body, raw = body + raw[:size], raw[size + 2:]
                if size == 0:
                    break
        else:
            body, raw = raw, b""
        out.append((status, headers, body))
    return out


def call_app(app, method="GET", path="/", query="", body=b"", headers=None):
    """Call a WSGI app without a socket, through wsgiref.validate; (status, headers, body)."""
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
               "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
    wsgiref.util.setup_testing_defaults(environ)
    captured = {}

    def start_response(status, fields, exc_info=None):
        captured["status"], captured["headers"] = status, fields
    result = wsgiref.validate.validator(app)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    return int(captured["status"][:3]), {k.lower(): v for k, v in captured["headers"]}, data


# ===========================================================================
# Configuration and limits
# ===========================================================================


# ===========================================================================
# Server: accept, poll, workers
# ===========================================================================


# ===========================================================================
# HTTP/1.1 parser
# ===========================================================================


# ===========================================================================
# WSGI bridge
# ===========================================================================


# ===========================================================================
# Application and dispatch
# ===========================================================================


# -- virtual hosts and proxies -------------------------------------------------


# ===========================================================================
# Tools: authentication
# ===========================================================================


# ===========================================================================
# Tools: static files
# ===========================================================================


# ===========================================================================
# Tools: uploads
# ===========================================================================


# ===========================================================================
# Reloader
# ===========================================================================


# ===========================================================================
# Command line and examples
# ===========================================================================


# ===========================================================================
# Hostile clients and load
# ===========================================================================

import logging  # noqa: E402
import struct  # noqa: E402

try:  # hypothesis is a test-only dependency; without it only the fuzz tests skip
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover
    st = None


def _status(raw):
    """The status code of the first response in ``raw`` (0 if none)."""
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _feed(data, config=None, step=None):
    """Every event the parser yields for ``data`` (fed whole or ``step`` bytes at a time)."""
    parser, events = minipub.RequestParser(minipub.make_config(config)), []
    for i in range(0, len(data), step or max(1, len(data))):
        parser.receive(data[i:i + (step or len(data))])
        while True:
            event = parser.next_event()
            if event is minipub.NEED_DATA:
                break
            events.append(event)
    return events


def _get(target=b"/", fields=b"", version=b"HTTP/1.1"):
    return b"GET " + target + b" " + version + b"\r\nHost: x\r\n" + fields + b"\r\n"


def _rst(sock):
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _wait_for(predicate, timeout=5.0, step=0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(step)  # polling a condition, bounded by the deadline
    return True


@pytest.fixture
def error_records():
    """ERROR-level records of minipub's loggers, whatever configure_logging did before."""
    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("minipub.error")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _exchange(port, data, timeout=5.0):
    """Like exchange(), but a reset after the response (Linux keeps what arrived) ends it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return _recv_until_close(sock, timeout)[0]


def _recv_until_close(sock, timeout=5.0):
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return b"".join(chunks), False
        except ConnectionResetError:  # closed too: the peer had unread bytes of ours
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


# -- limits at the limit and one past -------------------------------------------

LINE_MAX = 8 * 1024


@pytest.mark.parametrize("step", [None, 1, 7])
def test_hostile_request_line_limit(step):
    at = _get(b"/" + b"a" * (LINE_MAX - len(b"GET / HTTP/1.1")))
    assert len(at.split(b"\r\n")[0]) == LINE_MAX
    assert _feed(at, step=step)[0].target.endswith(b"a".decode() * 10)
    past = _get(b"/" + b"a" * (LINE_MAX + 1 - len(b"GET / HTTP/1.1")))
    with pytest.raises(minipub.ProtocolError) as err:
        _feed(past, step=step)
    assert err.value.status == 414


@pytest.mark.parametrize("step", [None, 1, 13])
def test_hostile_header_count_limit(step):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(99))  # + Host = 100
    assert len(_feed(_get(b"/", fields), step=step)[0].headers) == 100
    with pytest.raises(minipub.ProtocolError) as err:
        _feed(_get(b"/", fields + b"X-Extra: v\r\n"), step=step)
    assert err.value.status == 431


def _header_section(size):
    """A head whose header section (between request line and blank line) is ``size`` bytes."""
    pad = size - len(b"Host: x\r\nX-Pad: ")
    return b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * pad + b"\r\n\r\n"


@pytest.mark.parametrize("step", [None, 1, 4093])
def test_hostile_header_section_limit(step):
    config = {"server.max_request_header_size": 2048} if step == 1 else None
    limit = 2048 if step == 1 else 64 * 1024
    assert len(_feed(_header_section(limit), config, step)[0].headers) == 2
    with pytest.raises(minipub.ProtocolError) as err:
        _feed(_header_section(limit + 1), config, step)
    assert err.value.status == 431


def _chunked(body_chunks, ext=b""):
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in body_chunks) + b"0\r\n\r\n"


@pytest.mark.parametrize("step", [None, 1])
def test_hostile_chunk_extension_limit(step):
    events = _feed(_chunked([b"hello"], b";" + b"e" * 1024), step=step)
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"hello"
    with pytest.raises(minipub.ProtocolError) as err:
        _feed(_chunked([b"hello"], b";" + b"e" * 1025), step=step)
    assert err.value.status == 400


def test_hostile_body_size_limit_parser():
    config = {"server.max_request_body_size": 1000}
    fixed = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    assert sum(len(e) for e in _feed(fixed % 1000 + b"b" * 1000, config) if isinstance(e, bytes)) == 1000
    with pytest.raises(minipub.ProtocolError) as err:
        _feed(fixed % 1001, config)
    assert err.value.status == 413
    assert _feed(_chunked([b"a" * 600, b"b" * 400]), config)[-1] is minipub.END_OF_MESSAGE
    with pytest.raises(minipub.ProtocolError) as err:
        _feed(_chunked([b"a" * 600, b"b" * 401]), config)
    assert err.value.status == 413


@pytest.mark.parametrize("data,status", [
    (_get(b"/" + b"a" * (LINE_MAX - 14)), 200),
    (_get(b"/" + b"a" * (LINE_MAX - 13)), 414),
    (_get(b"/", b"".join(b"X-F%d: v\r\n" % i for i in range(99))), 200),
    (_get(b"/", b"".join(b"X-F%d: v\r\n" % i for i in range(100))), 431),
    (_header_section(64 * 1024), 200),
    (_header_section(64 * 1024 + 1), 431),
    (_chunked([b"x" * 10], b";" + b"e" * 1024), 200),
    (_chunked([b"x" * 10], b";" + b"e" * 1025), 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000, 200),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n", 413),
    (_chunked([b"a" * 999, b"b"]), 200),
    (_chunked([b"a" * 999, b"bc"]), 413),
], ids=["line", "line+1", "fields", "fields+1", "section", "section+1", "ext", "ext+1",
        "length", "length+1", "chunked", "chunked+1"])
def test_hostile_limits_over_the_wire(serve, data, status):
    server = serve(hello_app, max_request_body_size=1000)
    raw = _exchange(server.port, data + _get(b"/", b"Connection: close\r\n"))
    assert _status(raw) == status
    answers = responses(raw)
    if status == 200:  # the connection stays usable: the second request is answered
        assert [a[0] for a in answers] == [200, 200] and answers[1][2] == b"hello "
    else:  # one error page, then the close: nothing after the error is read
        assert len(answers) == 1
        _, headers, body = answers[0]
        assert headers["connection"] == "close"
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["x-content-type-options"] == "nosniff"


def test_hostile_pipelined_requests_yield_the_worker(serve):
    """After max_pipelined_requests a connection goes behind a waiting one."""
    order, release = [], threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/a0":  # hold the only worker until B's head is queued
            release.wait(5)
        order.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    for count in (16, 17):
        order.clear()
        release.clear()
        server = serve(app, thread_pool=1, max_pipelined_requests=16)
        a = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        a.sendall(b"".join(_get(b"/a%d" % i) for i in range(count)))
        assert _wait_for(lambda: order == [] and server._work.qsize() == 0)
        b = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        b.sendall(_get(b"/b"))
        assert _wait_for(lambda: server._work.qsize() == 1)
        release.set()
        assert _wait_for(lambda: len(order) == count + 1)
        assert order.index("/b") == 16
        a.close()
        b.close()


# -- deadlines ------------------------------------------------------------------

def test_hostile_head_deadline_dribbling_client_gets_408(serve):
    server = serve(hello_app, head_timeout=0.5)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    start, raw = time.monotonic(), b""
    sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
    sock.settimeout(0.05)
    while time.monotonic() - start < 5:
        try:
            sock.sendall(b"a")  # one byte every 50 ms: a per-recv timeout would never fire
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break
        raw += chunk
    elapsed = time.monotonic() - start
    sock.close()
    assert _status(raw) == 408 and b"Connection: close" in raw
    assert 0.4 < elapsed < 3


def test_hostile_head_deadline_silent_client_is_closed(serve):
    server = serve(hello_app, head_timeout=0.3)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        start = time.monotonic()
        raw, closed = _recv_until_close(sock)
    assert raw == b"" and closed and time.monotonic() - start < 3


def test_hostile_keepalive_idle_timeout(serve):
    server = serve(hello_app, keepalive_timeout=0.3)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_get())
        start = time.monotonic()
        raw, closed = _recv_until_close(sock)
    assert responses(raw)[0][2] == b"hello " and closed
    assert 0.25 < time.monotonic() - start < 3


class _Upload:
    @minipub.expose
    def index(self):
        return "hello " + minipub.request.body.read().decode()


@pytest.mark.parametrize("app", [hello_app, minipub.Application(_Upload())], ids=["wsgi", "framework"])
def test_hostile_slow_body_gets_408(serve, app):
    server = serve(app, socket_timeout=0.3, min_body_rate=1000)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    start, raw = time.monotonic(), b""
    sock.settimeout(0.05)
    while time.monotonic() - start < 5:
        try:
            sock.sendall(b"b" * 5)  # ~100 bytes/s, far under 1000
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break
        raw += chunk
    sock.close()
    assert _status(raw) == 408 and time.monotonic() - start < 3
    fast = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n"
    assert responses(exchange(server.port, fast + b"b" * 100000))[0][0] == 200


def test_hostile_connection_cap_answers_503_at_once(serve):
    server = serve(hello_app, max_connections=3)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    held[0].sendall(_get())  # one busy keep-alive, two silent: all count
    assert responses(held[0].recv(65536))[0][0] == 200
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as fourth:
        fourth.sendall(_get())
        raw, closed = _recv_until_close(fourth)
    assert _status(raw) == 503 and closed and time.monotonic() - start < 1
    assert b"nosniff" in raw
    held.pop().close()
    assert _wait_for(lambda: _status(_exchange(server.port, _get(b"/", b"Connection: close\r\n"))) == 200)
    for sock in held:
        sock.close()


# -- resets ---------------------------------------------------------------------

def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_hostile_resets_at_every_point_cost_nothing(error_records):
    threads, fds = threading.active_count(), _fd_count()
    entered, closed = threading.Event(), threading.Event()

    class Root:
        @minipub.expose
        def upload(self):
            entered.set()
            return "%d" % len(minipub.request.body.read())

    framework = minipub.Application(Root())

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/upload":
            return framework(environ, start_response)
        if environ["PATH_INFO"] == "/raw-upload":
            entered.set()
            return hello_app(environ, start_response)
        if environ["PATH_INFO"] == "/stream":
            def stream():
                try:
                    for _ in range(2000):  # 128 MB: far more than socket buffers hold
                        yield b"x" * 65536
                finally:
                    closed.set()
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return stream()
        return hello_app(environ, start_response)
    server = minipub.Server(app, "127.0.0.1", 0, thread_pool=2).start()
    port, ok = server.port, _get(b"/", b"Connection: close\r\n")
    try:
        for round_ in range(3):
            _rst(socket.create_connection(("127.0.0.1", port)))  # before the request
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET / HTTP/1.1\r\nHo")  # mid-head
            _rst(sock)
            for path in (b"/upload", b"/raw-upload"):  # mid-body, framework and bare WSGI
                entered.clear()
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                             b"Content-Type: application/octet-stream\r\n\r\n" + b"b" * 100)
                assert entered.wait(5)
                _rst(sock)
            closed.clear()
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(_get(b"/stream"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")  # mid-response
            _rst(sock)
            assert closed.wait(5)  # the app's iterable was closed
            assert exchange(port, ok).endswith(b"hello ")
        assert _wait_for(lambda: len(server._conns) == 0)
    finally:
        server.stop(10)
    assert not [r.getMessage() for r in error_records]
    assert _wait_for(lambda: threading.active_count() == threads)
    assert _wait_for(lambda: _fd_count() == fds)


# -- response side --------------------------------------------------------------

@pytest.mark.parametrize("status,headers", [
    ("200 OK\r\nX-Evil: 1", []), ("200 O\nK", []), ("200 O\rK", []), ("200 O\x00K", []),
    ("200 OK", [("X-A\r\nX-Evil", "1")]), ("200 OK", [("X-A\n", "1")]), ("200 OK", [("X\x00A", "1")]),
    ("200 OK", [("X-A", "1\r\nX-Evil: 1")]), ("200 OK", [("X-A", "1\nX-Evil: 1")]),
    ("200 OK", [("X-A", "1\rX-Evil: 1")]), ("200 OK", [("X-A", "1\x00")]),
    ("200 OK", [("Connection", "close")]), ("200 OK", [("Transfer-Encoding", "chunked")]),
    ("200 OK", [("Keep-Alive", "timeout=5")]), ("200 OK", [("Upgrade", "h2c")]),
    ("200 OK", [("TE", "trailers")]), ("200 OK", [("Trailer", "X")]),
    ("200 OK", [("Proxy-Connection", "x")]),
])
def test_hostile_response_header_injection_is_a_500(serve, error_records, status, headers):
    def app(environ, start_response):
        start_response(status, headers)
        return [b"body"]
    raw = exchange(serve(app).port, _get(b"/", b"Connection: close\r\n"))
    assert _status(raw) == 500
    assert b"X-Evil" not in raw and b"h2c" not in raw and b"\x00" not in raw
    assert [r for r in error_records if r.exc_info and r.exc_info[0] is ValueError]


def test_hostile_response_headers_assignment_refuses_controls():
    resp = minipub.Response()
    for bad in ("a\r\nb", "a\nb", "a\rb", "a\x00b"):
        with pytest.raises(ValueError):
            resp.headers["X-A"] = bad
        with pytest.raises(ValueError):
            resp.headers["X-" + bad] = "v"
        with pytest.raises(ValueError):
            resp.headers = {"X-A": bad}
    assert "X-A" not in resp.headers

    class Root:
        @minipub.expose
        def index(self):
            minipub.response.headers["X-A"] = "1\r\nSet-Cookie: evil=1"
            return "never"
    status, headers, body = call_app(minipub.Application(Root()))
    assert status == 500 and "set-cookie" not in headers and b"never" not in body


@pytest.mark.parametrize("url,location", [
    ("//evil.example/x", "http://evil.example/x"),
    ("/\\evil.example/x", "http://evil.example/x"),
    ("\\\\evil.example/x", "http://evil.example/x"),
    ("/here", "http://site.example/here"),
    ("there", "http://site.example/dir/there"),
])
def test_hostile_redirect_location_is_absolute_and_explicit(url, location):
    class Dir:
        @minipub.expose
        def page(self):
            raise minipub.HTTPRedirect(url)

    class Root:
        dir = Dir()
    status, headers, body = call_app(minipub.Application(Root()), path="/dir/page",
                                     headers={"Host": "site.example"})
    assert status == 303 and headers["location"] == location
    assert headers["x-content-type-options"] == "nosniff"


def test_hostile_error_pages_escaped_nosniff_no_traceback():
    class Root:
        @minipub.expose
        def refuse(self):
            raise minipub.HTTPError(400, "<script>alert(1)</script>")

        @minipub.expose
        def crash(self):
            raise RuntimeError("<b>secret</b>")
    for show in (False, True):
        app = minipub.Application(Root(), {"request.show_tracebacks": show})
        status, headers, body = call_app(app, path="/refuse")
        assert status == 400 and b"&lt;script&gt;" in body and b"<script>" not in body
        status, headers, crash = call_app(app, path="/crash")
        assert status == 500
        assert (b"Traceback" in crash) is show and b"<b>" not in crash
        assert (b"&lt;b&gt;secret" in crash) is show
        for page in (headers,):
            assert page["content-type"] == "text/html; charset=utf-8"
            assert page["x-content-type-options"] == "nosniff"
    page = minipub.error_page(404, "<i>x</i>", "<tb>")
    assert b"<i>" not in page and b"<tb>" not in page and b"charset=\"utf-8\"" in page


# -- fuzzing the parser ---------------------------------------------------------

if st is None:
    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_hostile_fuzz_parser_events_or_protocol_error():
        pass

else:
    _SEEDS = [
        _get(), _get(b"/p?q=1", b"Accept: */*\r\nCookie: a=b\r\n"),
        _chunked([b"hello", b"world"], b";x=y"),
        b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"GET http://h/p HTTP/1.0\r\n\r\n", b"OPTIONS * HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nT: v\r\n\r\n",
    ]
    _ATOMS = [b"\r\n", b"\r", b"\n", b" ", b"\t", b":", b";", b"\x00", b"\xff", b"0", b"f" * 17,
              b"Content-Length: ", b"Transfer-Encoding: chunked", b"Host: ", b"HTTP/1.1", b"\r\n\r\n",
              b"9" * 20, b"chunked, chunked", b"Expect: x", b"_", b"[::1]", b"%00", b"#"]


    @st.composite
    def _requests(draw):
        if draw(st.booleans()):
            return draw(st.binary(max_size=300))
        data = bytearray(draw(st.sampled_from(_SEEDS)))
        for _ in range(draw(st.integers(1, 6))):
            where = draw(st.integers(0, len(data)))
            action = draw(st.sampled_from(["insert", "delete", "replace", "flip"]))
            atom = draw(st.sampled_from(_ATOMS) | st.binary(min_size=1, max_size=8))
            if action == "insert":
                data[where:where] = atom
            elif action == "delete":
                del data[where:where + draw(st.integers(1, 8))]
            elif action == "replace":
                data[where:where + len(atom)] = atom
            elif data:
                data[min(where, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)


    def _fuzz_once(data, step, config=None):
        try:
            events = _feed(data, config, step)
        except minipub.ProtocolError as err:
            assert 400 <= err.status <= 599, err.status
            return
        for event in events:
            assert isinstance(event, (minipub.RequestHead, bytes)) or event is minipub.END_OF_MESSAGE


    @settings(max_examples=1000, deadline=500, suppress_health_check=[HealthCheck.too_slow])
    @given(data=_requests(), step=st.sampled_from([None, 1, 3]), tail=st.binary(max_size=40))
    def test_hostile_fuzz_parser_events_or_protocol_error(data, step, tail):
        _fuzz_once(data, step)
        _fuzz_once(data + tail, step)  # trailing bytes: the next request, or garbage


    @settings(max_examples=30, deadline=2000)
    @given(filler=st.sampled_from([b" ", b"a", b"\t", b":", b"a:", b"\r", b"0"]),
           field=st.booleans())
    def test_hostile_fuzz_parser_linear_time_on_long_inputs(filler, field):
        # CVE-2020-5236: a header regex that backtracks takes exponential time.
        data = b"GET / HTTP/1.1\r\nHost: x\r\n" + (b"X: " if field else b"") + filler * 60000 + b"\r\n\r\n"
        for step in (None, 4096):
            _fuzz_once(data, step)


def test_hostile_framework_body_error_says_close(serve):
    """A framing error met by a handler reading the body: its page carries Connection: close."""
    class Root:
        @minipub.expose
        def index(self):
            return "%d" % len(minipub.request.body.read())
    server = serve(minipub.Application(Root()), max_request_body_size=1000)
    raw = _exchange(server.port, _chunked([b"a" * 999, b"bc"]) + _get())
    answers = responses(raw)
    assert [a[0] for a in answers] == [413] and answers[0][1]["connection"] == "close"
