"""Tests for minipub, in the same sections as the module.

Unit tests call the parser and the WSGI application directly; integration
tests start a real minipub.Server on port 0 and talk to it over sockets.
Every test is bounded in time; none sleeps a fixed time.
"""
import base64
import hashlib
import html
import io
import json
import logging
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import wsgiref.util
import wsgiref.validate
import zlib
from urllib.parse import urlencode, urlsplit
from wsgiref.validate import validator

import pytest

import minipub
from examples import faq, hello, library

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# helpers shared by every section
# ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _minipub_loggers_restored():
    """A test that configures minipub's logging in-process (quickstart, engine.start) leaves caplog working."""
    loggers = [logging.getLogger("minipub." + name) for name in ("error", "access")]
    saved = [(logger.handlers[:], logger.propagate, logger.level) for logger in loggers]
    yield
    for logger, (handlers, propagate, level) in zip(loggers, saved):
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)


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


def free_port():
    """A port that was free a moment ago (for servers started as subprocesses)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exchange(port, data, timeout=5.0):
    """Send raw bytes; return everything received until the peer closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return recv_until_close(sock, timeout)[0]


def recv_until_close(sock, timeout=5.0):
    """(bytes received, closed?): a close, or a reset after the answer (Linux keeps what arrived)."""
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


def wait_until(predicate, timeout=5.0, step=0.01):
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(step)  # polling a condition, bounded by the deadline
    return True


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


def call_app(app, method="GET", path="/", query="", body=b"", headers=None, environ=None):
    """Call a WSGI app without a socket, through wsgiref.validate; (status, headers, body).

    A query may be given inline ("/x?a=1"); ``environ`` adds, overrides or (with
    None) removes keys.  Repeated response headers are joined with ", ".
    """
    if "?" in path and not query:
        path, query = path.split("?", 1)
    env = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "QUERY_STRING": query,
           "PATH_INFO": path.encode("utf-8").decode("latin-1"),  # PEP 3333: bytes as latin-1
           "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        env[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
    env.update(environ or {})
    wsgiref.util.setup_testing_defaults(env)
    for key in [k for k, v in env.items() if v is None]:
        del env[key]  # environ={"HTTP_HOST": None}: no Host at all
    captured = {}

    def start_response(status, fields, exc_info=None):
        captured["status"], captured["headers"] = status, fields
    result = wsgiref.validate.validator(app)(env, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    merged = {}
    for name, value in captured["headers"]:
        name = name.lower()
        merged[name] = merged[name] + ", " + value if name in merged else value
    return int(captured["status"][:3]), merged, data


# ===========================================================================
# Configuration and limits
# ===========================================================================

def test_config_defaults_and_types():
    config = minipub.make_config({"server.socket_port": 9000, "server.socket_timeout": 3})
    assert config["server.socket_port"] == 9000 and config["server.socket_timeout"] == 3.0
    assert config["server.socket_host"] == "127.0.0.1" and config["server.thread_pool"] == 10
    with pytest.raises(minipub.ConfigError, match="server.socket_prot"):
        minipub.make_config({"server.socket_prot": 1})
    with pytest.raises(minipub.ConfigError, match="server.thread_pool"):
        minipub.make_config({"server.thread_pool": "ten"})
    with pytest.raises(minipub.ConfigError, match="negative"):
        minipub.make_config({"server.head_timeout": -1})
    with pytest.raises(minipub.ConfigError):
        minipub.Server(hello_app, "127.0.0.1", 0, no_such_option=1)


@pytest.mark.parametrize("key,value", [
    ("server.socket_port", 65536), ("server.socket_port", 70000), ("server.socket_port", 99999),
    ("server.socket_port", -1), ("server.thread_pool", 0), ("log.access_format", "fancy"),
])
def test_config_out_of_range_values_are_refused(key, value):
    with pytest.raises(minipub.ConfigError, match=re.escape(key)):
        minipub.make_config({key: value})
    with pytest.raises(minipub.ConfigError):
        minipub.Server(hello_app, config={key: value}) if key != "server.socket_port" else \
            minipub.Server(hello_app, "127.0.0.1", value)


def test_config_range_ends_are_accepted():
    for key, value in [("server.socket_port", 0), ("server.socket_port", 65535), ("server.thread_pool", 1),
                       ("log.access_format", "combined")]:
        assert minipub.make_config({key: value})[key] == value


def test_config_ini_file(tmp_path):
    ini = tmp_path / "site.ini"
    ini.write_text("[global]\nserver.socket_port = 9090\nlog.screen = False\n"
                   "server.trusted_proxies = ['10.0.0.0/8']\n")
    config = minipub.load_config(str(ini))
    assert config["server.socket_port"] == 9090 and config["log.screen"] is False
    assert config["server.trusted_proxies"] == ("10.0.0.0/8",)
    ini.write_text("[global]\nserver.socket_host = __import__('os').system('false')\n")
    with pytest.raises(minipub.ConfigError, match="not a Python literal"):
        minipub.load_config(str(ini))
    ini.write_text("[global]\nserver.bogus = 1\n")
    with pytest.raises(minipub.ConfigError, match="server.bogus"):
        minipub.load_config(str(ini))
    ini.write_text("[/]\ntools.x.on = True\n")  # path sections are checked too, per namespace
    with pytest.raises(minipub.ConfigError, match=r"unknown tool 'x' in config key 'tools.x.on' in \[/\]"):
        minipub.load_config(str(ini))
    ini.write_text("[static]\nx = 1\n")
    with pytest.raises(minipub.ConfigError, match="unknown section"):
        minipub.load_config(str(ini))


def test_every_limit_has_a_reason_and_a_cli_option():
    help_text = minipub._help()
    for key, default, unit, why in minipub.LIMITS:
        assert why and unit in minipub._UNIT_TYPES
        assert "--" + key in help_text
        assert minipub.make_config()[key] == default


# ===========================================================================
# Server: accept, poll, workers
# ===========================================================================

def test_keepalive_and_pipelining_in_order(serve):
    server = serve(hello_app)
    raw = (b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
           b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
           b"POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n1\r\nz\r\n0\r\n\r\n"
           b"GET /4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    got = responses(exchange(server.port, raw))
    assert [(status, body) for status, _, body in got] == [
        (200, b"hello "), (200, b"hello abc"), (200, b"hello xyz"), (200, b"hello ")]
    assert got[-1][1]["connection"] == "close"


def test_keepalive_sequential_requests_share_one_connection(serve):
    server = serve(hello_app)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        for i in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            data = b""
            while not data.endswith(b"hello "):
                data += sock.recv(4096)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")


def test_http10_client_and_head(serve):
    server = serve(hello_app)
    status, headers, body = responses(exchange(server.port, b"GET / HTTP/1.0\r\n\r\n"))[0]
    assert (status, body) == (200, b"hello ")
    raw = exchange(server.port, b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert raw.endswith(b"\r\n\r\n") and b"Content-Length: 6\r\n" in raw


def test_chunked_response_for_unknown_length(serve):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (part for part in [b"ab", b"", b"cd"])
    server = serve(app)
    raw = exchange(server.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in raw and raw.endswith(b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")
    raw10 = exchange(server.port, b"GET / HTTP/1.0\r\n\r\n")
    assert raw10.endswith(b"\r\n\r\nabcd") and b"chunked" not in raw10


def test_expect_100_continue(serve):
    server = serve(hello_app)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"body")
        data = b""
        while not data.endswith(b"hello body"):
            data += sock.recv(4096)


def test_expect_100_is_answered_by_the_poll_role_and_413_at_once_over_the_limit(serve):
    """The poll role reads the body before the application runs (issue 11): it asks for it with 100
    as it starts; a declared length over server.max_request_body_size gets 413 and no 100."""
    def app(environ, start_response):
        start_response("403 Forbidden", [("Content-Type", "text/plain")])
        return [b"no"]
    server = serve(app, max_request_body_size=1000)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 99\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"x" * 99 + b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert [status for status, _, _ in responses(recv_until_close(sock)[0])] == [403, 403]
    raw = exchange(server.port, b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 413") and b"100 Continue" not in raw


def test_unread_body_is_drained_or_connection_closed(serve):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]
    server = serve(app)
    small = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nGET /x"
    got = responses(exchange(server.port, small + b"GET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert [body for _, _, body in got] == [b"/a", b"/b"]  # the body never became a request
    big = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3000000\r\n\r\n" + b"GET /x" * 500000
    got = responses(exchange(server.port, big + b"GET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert [body for _, _, body in got] == [b"/a", b"/b"]  # nor a body spooled beyond body_buffer_size


def test_absolute_form_target(serve):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [("%s %s %s" % (environ["HTTP_HOST"], environ["PATH_INFO"], environ["QUERY_STRING"])).encode()]
    server = serve(app)
    raw = exchange(server.port, b"GET http://example.com:8000/p%20q?x=1 HTTP/1.1\r\nHost: other\r\n"
                                b"Connection: close\r\n\r\n")
    assert responses(raw)[0][2] == b"example.com:8000 /p q x=1"


@pytest.mark.parametrize("bad", [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, deflate\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2;a:bc=123\r\nab\r\n0\r\n\r\n",
])
def test_framing_error_answers_once_and_closes(serve, bad):
    server = serve(hello_app)
    got = responses(exchange(server.port, bad + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert [status for status, _, _ in got] == [400]
    assert got[0][1]["connection"] == "close"


def test_framing_error_in_body_is_answered_before_the_app_runs(serve):
    called = []

    def app(environ, start_response):
        called.append(environ["PATH_INFO"])
        return hello_app(environ, start_response)
    server = serve(app)
    bad = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX"
    got = responses(exchange(server.port, bad + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert [status for status, _, _ in got] == [400] and called == []  # the poll role decodes bodies


def test_small_response_is_one_write(serve, monkeypatch):
    writes = []
    original = minipub._Conn.send
    monkeypatch.setattr(minipub._Conn, "send", lambda conn, data: (writes.append(data), original(conn, data)))
    server = serve(hello_app)
    exchange(server.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\nhello ")


def test_idle_server_sleeps_without_timeout(serve):
    server = serve(hello_app)
    assert server._poll.next_timeout() is None  # select() blocks forever: no periodic wake-ups
    names = {t.name for t in threading.enumerate()}
    assert names >= {"minipub-watch", "minipub-0"}  # one worker until load needs more
    assert sum(n.startswith("minipub-") for n in names) == 2


BIG = b"".join(b"%07d\n" % i for i in range(1_000_000))  # 8 MB: beyond the socket buffers of a non-reader


def _slow_clients_app(environ, start_response):
    if environ["PATH_INFO"] == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return (BIG[i:i + 65536] for i in range(0, len(BIG), 65536))
    return hello_app(environ, start_response)


def _non_reader(port, path=b"/big"):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def test_slow_uploads_and_non_reading_clients_hold_no_worker(serve):
    """Issue 11: with two workers, 50 uploads stalled mid-body (small, over body_buffer_size and
    spooled to disk, chunked, after 100 Continue) and 20 clients that do not read an 8 MB answer
    leave the server answering at once; a client that speeds up gets every byte."""
    server = serve(_slow_clients_app, thread_pool=2, body_buffer_size=64 * 1024)
    big = b"".join(b"%07d\n" % i for i in range(20000))  # 160 kB: over body_buffer_size
    starts = {"small": b"Content-Length: 1000\r\n\r\nab", "large": b"Content-Length: %d\r\n\r\n%s" % (
        len(big), big[:100000]), "chunked": b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s" % (len(big), big[:100000]),
        "continue": b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(big)}
    uploaders = {}
    for i in range(50):
        kind = list(starts)[i % 4]
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n" + starts[kind])
        uploaders.setdefault(kind, []).append(sock)
    readers = [_non_reader(server.port) for _ in range(20)]
    poll = server._poll
    assert wait_until(lambda: len(poll.timers["body"]) == 50 and len(poll.timers["write"]) == 20, timeout=20)
    assert sum(conn.body.file is not None for conn in poll.timers["body"]) == 25  # large and chunked: on disk
    for _ in range(5):
        started = time.monotonic()
        got = exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert got.endswith(b"hello ") and time.monotonic() - started < 1.0
    rests = {"small": b"c" * 998, "large": big[100000:], "chunked": big[100000:] + b"\r\n0\r\n\r\n"}
    bodies = {"small": b"ab" + b"c" * 998, "large": big, "chunked": big, "continue": big}
    for kind, sock in [(kind, socks[0]) for kind, socks in uploaders.items()]:  # the rest of one body each
        if kind == "continue":
            assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(big)
        else:
            sock.sendall(rests[kind])
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = responses(recv_until_close(sock, timeout=20)[0])
        assert [(status, body) for status, _, body in got] == [(200, b"hello " + bodies[kind]), (200, b"hello ")]
    fast = readers.pop()
    fast.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # pipelined behind it
    got = responses(recv_until_close(fast, timeout=20)[0])
    assert [(status, body) for status, _, body in got] == [(200, BIG), (200, b"hello ")]
    files = [conn.body.file for conn in poll.timers["body"] if conn.body.file is not None]
    for sock in [sock for socks in uploaders.values() for sock in socks] + readers:
        sock.close()
    assert wait_until(lambda: not server._conns and server._unsent == 0, timeout=10)
    assert files and all(file.closed for file in files)  # gone with their clients


def test_a_non_reader_that_disconnects_frees_its_buffer_and_file_at_once(serve):
    server = serve(_slow_clients_app, thread_pool=1)
    sock = _non_reader(server.port)
    assert wait_until(lambda: len(server._poll.timers["write"]) == 1, timeout=10)
    conn = next(iter(server._poll.timers["write"]))
    spill = conn.spill
    assert spill is not None and server._unsent > 0  # in memory up to its bound, the rest on disk
    sock.close()
    assert wait_until(lambda: spill.closed and server._unsent == 0 and not server._conns, timeout=2)


_LOG_LINE = re.compile(r'127\.0\.0\.1 - - \[[^]]+\] "GET (/\w*) HTTP/1\.1" (\d+) (\d+|-)')


def test_access_log_is_written_when_the_response_is_sent_with_the_bytes_sent(serve, tmp_path, restore_logging):
    log = tmp_path / "access.log"
    minipub.configure_logging(minipub.make_config({"log.screen": False, "log.access_file": str(log)}))
    server = serve(_slow_clients_app, thread_pool=1)
    lines = lambda: [m.groups() for m in map(_LOG_LINE.fullmatch, log.read_text().splitlines()) if m]  # noqa: E731
    reader, gone = _non_reader(server.port), _non_reader(server.port)
    assert wait_until(lambda: len(server._poll.timers["write"]) == 2, timeout=10)
    assert exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").endswith(b"hello ")
    assert wait_until(lambda: lines() == [("/", "200", "6")])  # queued responses are not logged yet
    gone.close()  # cut short: logged with the bytes that went, not the 8 MB queued
    assert wait_until(lambda: len(lines()) == 2)
    assert lines()[1][:2] == ("/big", "200") and int(lines()[1][2]) < len(BIG)
    reader.settimeout(20)  # reads it all: logged once the last byte went
    got = b""
    while not got.endswith(b"0\r\n\r\n"):
        got += reader.recv(1 << 20)
    assert wait_until(lambda: len(lines()) == 3) and lines()[2] == ("/big", "200", str(len(BIG)))
    reader.close()


def test_over_max_unsent_bytes_a_response_partly_sent_is_cut_by_a_close(serve):
    """Issue 11: the bound on queued output is never an OOM; the client sees a body cut short."""
    done = threading.Event()

    def app(environ, start_response):
        def stream():
            try:
                for i in range(0, len(BIG), 65536):
                    yield BIG[i:i + 65536]
            finally:
                done.set()  # closed early: the server stopped asking
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return stream() if environ["PATH_INFO"] == "/big" else [b"hello "]
    server = serve(app, thread_pool=1, max_unsent_bytes=1 << 20)
    sock = _non_reader(server.port)
    assert done.wait(10) and 0 < server._unsent <= 1 << 20  # what was queued still goes, then the close
    raw, closed = recv_until_close(sock, timeout=10)
    assert closed and raw.startswith(b"HTTP/1.1 200 OK") and len(raw) < len(BIG) and not raw.endswith(b"0\r\n\r\n")
    assert wait_until(lambda: server._unsent == 0 and not server._conns, timeout=5)
    assert exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").endswith(b"hello ")


def test_over_max_unsent_bytes_a_response_none_of_which_went_is_a_503():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [BIG]
    server = minipub.Server(app, "127.0.0.1", 0, max_unsent_bytes=len(BIG) // 2)
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    for size in (65536, 1):  # the client reads nothing: our side is full
        try:
            while True:
                ours.send(b"f" * size)
        except BlockingIOError:
            pass
    conn = minipub._Conn(ours, ("127.0.0.1", 1), server)
    conn.parser = minipub.RequestParser(server.config)
    conn.parser.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.head = conn.parser.next_event()
    assert minipub._Exchange(server, conn).run() is False  # the connection closes after the 503
    assert 0 < server._unsent < 1000  # only the 503 is queued
    got = bytearray()
    for _ in range(1000):
        try:
            got += peer.recv(1 << 20)
        except BlockingIOError:
            if not conn.flush() and not conn.out:
                break
    answer = bytes(got).lstrip(b"f")
    assert answer.startswith(b"HTTP/1.1 503 ") and b"Connection: close\r\n" in answer and b"200 OK" not in answer
    conn.discard()
    assert server._unsent == 0
    ours.close()
    peer.close()


def test_a_tls_write_that_needs_a_read_waits_to_read_without_spinning():
    """SSLWantReadError from a send (a TLS key update or renegotiation): select() for reading."""
    import ssl

    class WantsRead:  # an SSLSocket whose next write needs a read first
        def __init__(self, sock):
            self.sock, self.sends = sock, 0

        def fileno(self):
            return self.sock.fileno()

        def send(self, data):
            self.sends += 1
            raise ssl.SSLWantReadError()
    server = minipub.Server(hello_app, "127.0.0.1", 0)
    server._prepare()
    ours, peer = socket.socketpair()
    try:
        conn = minipub._Conn(WantsRead(ours), ("127.0.0.1", 1), server)
        conn.want = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
        conn.out.append(b"queued")
        poll = server._poll
        poll.wait(conn, "write")
        assert [events for key, events in poll.sel.select(0) if key.data is conn] == [selectors.EVENT_WRITE]
        poll.flush(conn)
        assert conn.registered == selectors.EVENT_READ and conn.kind == "write" and conn.sock.sends == 1
        assert not [key for key, _ in poll.sel.select(0) if key.data is conn]  # writable, but not woken
        peer.send(b"x")  # the TLS record it waits for
        assert [key for key, _ in poll.sel.select(1) if key.data is conn]
    finally:
        server._poll.close_all(True)
        ours.close()
        peer.close()


def test_a_file_for_a_non_reader_is_sent_from_the_poll_role(serve, tmp_path, restore_logging):
    """wsgi.file_wrapper to a client that reads late: queued as (file, offset, length), no worker held;
    its access-log line is written once the poll role has sent the last byte."""
    path, log = tmp_path / "big.bin", tmp_path / "access.log"
    path.write_bytes(BIG)
    minipub.configure_logging(minipub.make_config({"log.screen": False, "log.access_file": str(log)}))
    lines = lambda: [m.groups() for m in map(_LOG_LINE.fullmatch, log.read_text().splitlines()) if m]  # noqa: E731

    def app(environ, start_response):
        if environ["PATH_INFO"] != "/big":
            return hello_app(environ, start_response)
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(BIG)))])
        return environ["wsgi.file_wrapper"](open(path, "rb"))
    server = serve(app, thread_pool=1)
    sock = _non_reader(server.port)
    assert wait_until(lambda: len(server._poll.timers["write"]) == 1, timeout=10)
    assert exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").endswith(b"hello ")
    assert server._unsent == 0  # a file costs a descriptor, not memory
    assert wait_until(lambda: lines() == [("/", "200", "6")])
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got = responses(recv_until_close(sock, timeout=20)[0])
    assert [(status, body) for status, _, body in got] == [(200, BIG), (200, b"hello ")]
    assert wait_until(lambda: lines()[1:] == [("/big", "200", str(len(BIG))), ("/", "200", "6")])


def test_blocking_handlers_run_concurrently_up_to_the_pool(serve):
    """A handler waiting on something does not hold up the others: the watchdog wakes more workers."""
    barrier = threading.Barrier(6, timeout=5)  # five requests and this test

    def waits(environ, start_response):
        barrier.wait()  # returns only once all five are inside the application at the same time
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"together"]
    server = serve(waits, thread_pool=5)
    results = []
    clients = [threading.Thread(target=lambda: results.append(
        exchange(server.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))) for _ in range(5)]
    [c.start() for c in clients]
    barrier.wait()
    [c.join(10) for c in clients]
    assert [responses(r)[0][2] for r in results] == [b"together"] * 5


def test_stop_finishes_in_flight_requests_and_leaks_no_threads(serve):
    before = threading.active_count()
    release, entered = threading.Event(), threading.Event()

    def slow(environ, start_response):
        entered.set()
        release.wait(5)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"finished"]
    server = minipub.Server(slow, "127.0.0.1", 0, thread_pool=2).start()
    result = {}
    client = threading.Thread(target=lambda: result.setdefault(
        "raw", exchange(server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")))
    client.start()
    assert entered.wait(5)
    stopper = threading.Thread(target=server.stop, args=(10,))
    stopper.start()
    release.set()
    stopper.join(10)
    client.join(10)
    assert responses(result["raw"])[0][2] == b"finished"
    assert b"Connection: close" in result["raw"]
    assert wait_until(lambda: threading.active_count() <= before)
    assert threading.active_count() == before


def test_serve_forever_in_a_thread_installs_no_signal_handlers():
    server = minipub.Server(hello_app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    assert server._ready.wait(5)
    assert responses(exchange(server.port, b"GET / HTTP/1.0\r\n\r\n"))[0][2] == b"hello "
    server.stop()
    thread.join(5)
    assert not thread.is_alive()


# -- robustness (issue 16): what one client or handler does ends nothing else --

def _connect(port, tls=None, handshake=True):
    """A client socket, wrapped in TLS (trusting the test CA) when ``tls`` is given."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if tls is None or not handshake:
        return sock
    import ssl
    context = ssl.create_default_context(cafile=tls["ca"])
    return context.wrap_socket(sock, server_hostname="localhost")


def _half_client_hello():
    """The first half of a real TLS ClientHello."""
    import ssl
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    return hello[:len(hello) // 2]


def _get_over(port, tls=None, path=b"/"):
    sock = _connect(port, tls)
    with sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return recv_until_close(sock)[0]


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_resets_at_every_step_leave_the_server_serving(serve, tls, error_records, secure):
    """2,000 connect-and-reset cycles (a reset inside wrap_socket() used to kill an HTTPS server),
    then resets mid-ClientHello or mid-head, after the handshake, mid-body and mid-response."""
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/stream":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return (b"x" * 65536 for _ in range(1000))
        return hello_app(environ, start_response)
    tls = tls if secure else None
    # body_buffer_size below the upload's length: the poll role spools it to a temporary file
    server = serve(app, thread_pool=2, body_buffer_size=1000, **(_tls_options(tls) if secure else {}))
    port, fds, started = server.port, _fd_count(), time.monotonic()
    for _ in range(2000):
        _rst(socket.create_connection(("127.0.0.1", port), timeout=5))
    assert _get_over(port, tls).endswith(b"hello ")
    sock = _connect(port, tls, handshake=False)
    sock.sendall(_half_client_hello() if secure else b"GET / HTTP/1.1\r\nHo")
    _rst(sock)
    if secure:
        _rst(_connect(port, tls))  # after a complete handshake
    sock = _connect(port, tls)
    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"b" * 2000)
    assert wait_until(lambda: any(c.body.file for c in list(server._poll.timers["body"])), timeout=5)
    _rst(sock)
    sock = _connect(port, tls)
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
    _rst(sock)
    assert _get_over(port, tls).endswith(b"hello ")
    assert time.monotonic() - started < 60
    assert server._thread.is_alive() and all(w.is_alive() for w in server._pool.workers)
    assert wait_until(lambda: len(server._conns) == 0)
    assert wait_until(lambda: _fd_count() <= fds)
    assert not [r.getMessage() for r in error_records]


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_a_spooled_body_then_a_pipelined_request_in_the_same_send(serve, tls, secure):
    # A Content-Length body over body_buffer_size goes from recv() to its file (the parser is
    # told how much it took); the request after it, sent with it, is answered next, in order.
    def app(environ, start_response):
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d:%s;" % (len(data), hashlib.sha256(data).hexdigest()[:8].encode())]
    tls = tls if secure else None
    server = serve(app, body_buffer_size=1000, **(_tls_options(tls) if secure else {}))
    body = os.urandom(3 * 1024 * 1024 + 7)
    with _connect(server.port, tls) as sock:
        sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (len(body), body))
        answer = recv_until_close(sock)[0]
    first = b"%d:%s;" % (len(body), hashlib.sha256(body).hexdigest()[:8].encode())
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.index(first) < answer.index(b"0:e3b0c442;")  # the empty body's sha256, second


@pytest.mark.parametrize("cls,where", [("_Acceptor", "_adopt"), ("_PollRole", "_pull")])
def test_a_fault_in_the_poll_role_drops_only_that_connection(serve, monkeypatch, error_records, cls, where):
    server = serve(hello_app)
    real, calls = getattr(getattr(minipub, cls), where), []

    def faulty(self, conn, *args):
        calls.append(conn)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(self, conn, *args)
    monkeypatch.setattr(getattr(minipub, cls), where, faulty)
    ok = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert exchange(server.port, ok) == b""  # closed without an answer
    assert responses(exchange(server.port, ok))[0][2] == b"hello "
    assert len(error_records) == 1 and error_records[0].exc_info[1].args == ("injected fault",)
    assert len(calls) >= 2 and server._thread.is_alive()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # CPython reports the decode
def test_odd_bytes_in_the_sni_name_fail_that_handshake_only(serve, tls):
    """CPython cannot decode a non-ASCII server_name for the SNI callback: that handshake fails."""
    root = minipub.VirtualHost(default=_Site("main"), domains={"api.example.test": (_Site("api"), tls["api"],
                                                                                    tls["api_key"])})
    server = serve(minipub.Application(root), **_tls_options(tls))
    for name in (b"\xff\xfe.test", b"a" * 255, b".."):
        subprocess.run([b"openssl", b"s_client", b"-connect", b"127.0.0.1:%d" % server.port, b"-servername", name],
                       input=b"", capture_output=True, timeout=20)
    assert _get_over(server.port, tls).endswith(b"main") and server._thread.is_alive()

def test_handler_sys_exit_is_a_500_and_the_workers_live_on(serve, error_records):
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/exit":
            sys.exit(3)
        if environ["PATH_INFO"] == "/interrupt":
            raise KeyboardInterrupt
        return hello_app(environ, start_response)
    server = serve(app, thread_pool=2)
    for path in (b"/exit", b"/exit", b"/interrupt"):
        assert responses(_get_over(server.port, path=path))[0][0] == 500
    assert responses(_get_over(server.port))[0][2] == b"hello "
    assert len(error_records) == 3 and all(w.is_alive() for w in server._pool.workers)


def _child(tmp_path, body):
    """A Python child process running ``body`` (which can import minipub); stderr collected."""
    script = tmp_path / "child.py"
    script.write_text("import os, socket, sys, threading\nsys.path.insert(0, %r)\nimport minipub\n" % HERE
                      + "minipub.configure_logging(minipub.make_config())\n" + body)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.lines = []
    reader = threading.Thread(target=lambda: proc.lines.extend(iter(proc.stderr.readline, b"")), daemon=True)
    reader.start()
    return proc


def _child_logged(proc, text, timeout=10.0):
    return wait_until(lambda: any(text in line.decode() for line in proc.lines), timeout)


def _cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_descriptor_exhaustion_pauses_accept_without_spinning(tmp_path):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to count descriptors")
    proc = _child(tmp_path, """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))  # no room to raise it: max_connections fits below
server = minipub.Server(lambda e, s: [s("200 OK", [("Content-Length", "2")]), b"ok"][1:], "127.0.0.1", 0)
server.start()
low = len(os.listdir("/proc/self/fd")) + 8
resource.setrlimit(resource.RLIMIT_NOFILE, (low, 200))  # now accept() hits EMFILE after a few clients
print(server.port, server.config["server.max_connections"], flush=True)
threading.Event().wait(60)
""")
    try:
        port, most = map(int, proc.stdout.readline().split())
        assert most == 150  # 200 minus the descriptors kept spare
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        assert _child_logged(proc, "cannot accept connections")
        cpu = _cpu_seconds(proc.pid)
        threading.Event().wait(1.0)  # a measuring window, not a readiness wait
        assert _cpu_seconds(proc.pid) - cpu < 0.3  # a busy loop on accept() would use the whole second
        for sock in clients:
            sock.close()
        assert wait_until(lambda: exchange(port, b"GET / HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok"), 10)
        assert _child_logged(proc, "accepting connections again")
        log = b"".join(proc.lines).decode()
        assert log.count("cannot accept connections") == 1 and log.count("accepting connections again") == 1
    finally:
        proc.kill()
        proc.wait(5)


def test_a_failed_listening_socket_stops_with_one_line_and_status_1(tmp_path):
    proc = _child(tmp_path, """
server = minipub.Server(minipub.Application(object()), "127.0.0.1", 0)
server._prepare()
threading.Thread(target=lambda: server._ready.wait(5) and server._sock.shutdown(socket.SHUT_RDWR)).start()
server.serve_forever()
""")
    try:
        assert proc.wait(20) == 1
    finally:
        proc.kill()
    errors = [line for line in proc.lines if b"ERROR" in line]
    assert len(errors) == 1 and b"the listening socket failed: [Errno 22]" in errors[0], proc.lines
    assert not [line for line in proc.lines if b"Traceback" in line]


def test_shutdown_logs_drains_with_503_and_a_second_signal_stops_at_once(tmp_path):
    import signal
    proc = _child(tmp_path, """
def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        print("entered", flush=True)
        threading.Event().wait(60)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]
server = minipub.Server(app, "127.0.0.1", 0, shutdown_timeout=30.0)
server._prepare()
print(server.port, flush=True)
server.serve_forever()
""")
    try:
        port = int(proc.stdout.readline())
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert proc.stdout.readline() == b"entered\n"
        proc.send_signal(signal.SIGTERM)
        assert _child_logged(proc, "stopping: waiting up to 30 s for 1 requests"), proc.lines
        with socket.create_connection(("127.0.0.1", port), timeout=5) as late:
            late.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            late.settimeout(5)
            raw = b""
            while True:
                chunk = late.recv(65536)  # a reset raises ConnectionResetError and fails the test
                if not chunk:
                    break
                raw += chunk
        status, headers, _ = responses(raw)[0]
        assert (status, headers["connection"]) == (503, "close")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0 and time.monotonic() - started < 5
        assert _child_logged(proc, "stopping: abandoned GET /slow from 127.0.0.1")
        slow.close()
    finally:
        proc.kill()
        proc.wait(5)


# ===========================================================================
# HTTP/1.1 parser
# ===========================================================================

NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def feed(raw, mode, config=None):
    """Feed ``raw`` whole, byte by byte, or with a trailing request; returns
    ([(method, target, body)], error status or None)."""
    parser = minipub.RequestParser(config)
    chunks = {"whole": [raw], "bytes": [raw[i:i + 1] for i in range(len(raw))],
              "trailing": [raw + NEXT]}[mode]
    requests, current = [], None
    try:
        for chunk in chunks:
            parser.receive(chunk)
            while True:
                event = parser.next_event()
                if event is minipub.NEED_DATA:
                    break
                if isinstance(event, minipub.RequestHead):
                    current = [event.method, event.target, b""]
                elif event is minipub.END_OF_MESSAGE:
                    requests.append(tuple(current))
                else:
                    current[2] += event
    except minipub.ProtocolError as err:
        if mode == "trailing":
            # the error is sticky: nothing after it is ever parsed as a request
            with pytest.raises(minipub.ProtocolError):
                parser.next_event()
        return requests, err.status
    if mode == "trailing":
        assert requests[-1] == ("GET", "/next", b"")
        requests.pop()
    return requests, None


MODES = ["whole", "bytes", "trailing"]
H = b"Host: x\r\n"
GOOD = [
    (b"GET / HTTP/1.1\r\n" + H + b"\r\n", [("GET", "/", b"")]),
    (b"GET /a?b=c HTTP/1.0\r\n\r\n", [("GET", "/a?b=c", b"")]),
    (b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", [("GET", "/", b"")]),  # one leading CRLF tolerated
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello", [("POST", "/", b"hello")]),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
     [("POST", "/", b"hello")]),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n6;name=val\r\n world\r\n0\r\nTrailer-Field: x\r\n\r\n",
     [("POST", "/", b"hello world")]),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n",
     [("POST", "/", b"0123456789")]),
    (b"GET http://example.com/p?q HTTP/1.1\r\nHost: other\r\n\r\n", [("GET", "http://example.com/p?q", b"")]),
    (b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", [("OPTIONS", "*", b"")]),
    (b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\nX-Tab:\tv\t\r\nX-Obs: caf\xe9\r\n\r\n", [("GET", "/", b"")]),
    (b"GET / HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n", [("GET", "/", b""), ("GET", "/2", b"")]),
]
TE = b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ), RFC 9112 7.1.1
GOOD += [(TE + line + b"\r\nab\r\n0\r\n\r\n", [("POST", "/", b"ab")]) for line in (
    b"2 ;a", b"2\t;\ta", b"2;a;b=c", b"2 ; a = b ; c", b'2;a="b"', b'2;a=""', b'2;a="q\\"d; \xe9"',
    b"2;!#$%&'*+-.^_`|~=x")]
# RFC 9110 5.6.1.2: empty list elements are ignored
GOOD += [(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: " + te + b"\r\n\r\n2\r\nab\r\n0\r\n\r\n",
          [("POST", "/", b"ab")]) for te in (b",chunked", b"chunked,", b" , ,chunked , ")]
BAD = [
    # Content-Length is 1*DIGIT and nothing else
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5_0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5 0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + "Content-Length: \uff15\r\n\r\n".encode("utf-8"), 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \xd9\xa5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1234567890123456789012\r\n\r\n", 400),
    # Transfer-Encoding must be exactly chunked; a final coding other than chunked is 400 (RFC 9112 6.3)
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, deflate\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: ,\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chun ked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # chunk-size = 1*HEXDIG, bounded; chunk data ends with CRLF
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 17 + b"5\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;" + b"e" * 2000 + b"\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", 400),
    # chunk-ext grammar (RFC 9112 7.1.1): a token name, a token or quoted-string value
    *[(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + line + b"\r\nab\r\n0\r\n\r\n", 400)
      for line in (b"2;", b"2;=x", b'2;a="b', b"3;x\x84=y", b"1;a:bc=123", b"2 ;", b"2;a=", b"2;a b", b"2;a=b c",
                   b'2;a="b"c', b'2;a="\x7f"', b"2;a=\x00", b"2;a=\"b\\\x01\"", b"2 ", b"2;;a", b"2;a,b", b"2\x0b;a")],
    # field syntax
    (b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X: a\x7fb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X : a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X\t: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X(y): a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b": a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X_Forwarded_For: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
    (b"GET / HTTP/1.1\n" + H + b"\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"Expect: something\r\n\r\n", 417),
    # request line
    (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    (b"GET / HTTP/1.2\r\n" + H + b"\r\n", 505),
    (b"GET / HTTP/1.1x\r\n" + H + b"\r\n", 400),
    (b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    (b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /\x00 HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /\xff HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /#frag HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET ftp://x/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"CONNECT example.com:443 HTTP/1.1\r\n" + H + b"\r\n", 501),
    (b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + H + b"".join(b"X%d: a\r\n" % i for i in range(101)) + b"\r\n", 431),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("raw,expected", GOOD)
def test_parser_accepts(raw, expected, mode):
    assert feed(raw, mode) == (expected, None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("raw,status", BAD)
def test_parser_rejects(raw, status, mode):
    requests, error = feed(raw, mode)
    assert error == status
    assert requests == []


def test_parser_limits_are_early_and_configurable():
    # 414 and 431 come before the head is complete, so a client cannot make us buffer more
    config = minipub.make_config({"server.max_request_line_size": 20, "server.max_request_header_size": 40})
    parser = minipub.RequestParser(config)
    parser.receive(b"GET /" + b"a" * 30)
    with pytest.raises(minipub.ProtocolError) as err:
        parser.next_event()
    assert err.value.status == 414
    parser = minipub.RequestParser(config)
    parser.receive(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 50)
    with pytest.raises(minipub.ProtocolError) as err:
        parser.next_event()
    assert err.value.status == 431
    at_limit = b"GET /" + b"a" * 6 + b" HTTP/1.1"  # exactly 20 bytes
    assert feed(at_limit + b"\r\nHost: x\r\n\r\n", "whole", config)[1] is None
    assert feed(at_limit.replace(b"/", b"/a") + b"\r\nHost: x\r\n\r\n", "whole", config)[1] == 414


def test_parser_body_limit_413():
    config = minipub.make_config({"server.max_request_body_size": 10})
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n" + b"a" * 11
    assert feed(raw, "whole", config)[1] == 413
    chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\naaaaaa\r\n5\r\naaaaa\r\n0\r\n\r\n"
    assert feed(chunked, "bytes", config)[1] == 413
    ok = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n" + b"a" * 10
    assert feed(ok, "whole", config) == ([("POST", "/", b"a" * 10)], None)


def test_parser_head_semantics():
    parser = minipub.RequestParser()
    parser.receive(b"POST http://Example.com:81/p?q=1 HTTP/1.0\r\nHost: other\r\nConnection: keep-alive\r\n"
                   b"Content-Length: 0\r\n\r\n")
    head = parser.next_event()
    assert (head.path, head.query, head.host, head.keep_alive) == ("/p", "q=1", "Example.com:81", True)
    parser = minipub.RequestParser()
    parser.receive(b"PUT / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\n"
                   b"Content-Length: 3\r\n\r\n")
    head = parser.next_event()
    assert (head.keep_alive, head.expect_continue, head.content_length) == (False, True, 3)
    assert parser.next_event() is minipub.NEED_DATA


def test_parser_reuses_a_repeated_head_and_never_caches_a_refusal():
    shared = {}
    first, second = minipub.RequestParser(None, shared), minipub.RequestParser(None, shared)
    plain = b"GET /a HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
    secret = b"GET /a HTTP/1.1\r\nHost: x\r\nCookie: sid=1\r\n\r\n"
    token = b"GET /a?token=s3cret HTTP/1.1\r\nHost: x\r\n\r\n"
    first.receive(plain * 2 + secret * 2 + token * 2)
    heads = [first.next_event() for _ in range(12)][::2]
    assert heads[0] is heads[1] and heads[2] is heads[3] and heads[4] is heads[5]  # parsed once per connection
    assert (heads[0].path, heads[2].path, heads[4].query) == ("/a", "/a", "token=s3cret")
    second.receive(plain + secret + token + b"GET / HTTP/1.1\r\nHost: x\r\nAUTHORIZATION: Basic eA==\r\n\r\n")
    assert second.next_event() is heads[0]  # shared by the server's connections...
    assert second.next_event() is minipub.END_OF_MESSAGE
    assert second.next_event() is not heads[2]  # ...unless it carries credentials
    assert second.next_event() is minipub.END_OF_MESSAGE
    assert second.next_event() is not heads[4]  # ...or a query string (tokens travel in one)
    assert second.next_event() is minipub.END_OF_MESSAGE and second.next_event().path == "/"
    assert list(shared) == [plain[:-4]]
    for _ in range(2):  # the same bad bytes fail every time
        parser = minipub.RequestParser(None, shared)
        parser.receive(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
        with pytest.raises(minipub.ProtocolError):
            parser.next_event()
    assert list(shared) == [plain[:-4]]
    for n in range(100):  # bounded
        first.receive(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
        assert first.next_event().path == "/%d" % n and first.next_event() is minipub.END_OF_MESSAGE
    assert len(first._heads) <= 8 and len(shared) <= 64


def test_a_shared_head_gives_each_connection_its_own_address(serve):
    def app(environ, start_response):
        body = "%s %s %s" % (environ["REMOTE_PORT"], environ.get("HTTP_ACCEPT"), environ.get("HTTP_X_SEEN"))
        environ["HTTP_X_SEEN"] = "changed by the app"  # an app may write its environ: not the cached one
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body.encode()]
    server = serve(app)
    seen = []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n")
            body = responses(recv_until_close(sock)[0])[0][2].decode()
            seen.append((body, str(sock.getsockname()[1])))
    assert [body for body, _ in seen] == ["%s */* None" % port for _, port in seen]
    assert len(server._poll.listener.heads) == 1


# ===========================================================================
# WSGI bridge
# ===========================================================================

def test_any_wsgi_app_with_write_callable(serve):
    def app(environ, start_response):
        write = start_response("201 Created", [("Content-Type", "text/plain"), ("Content-Length", "6")])
        write(b"abc")
        return [b"def"]
    server = serve(app)
    status, headers, body = responses(exchange(server.port, b"GET / HTTP/1.0\r\n\r\n"))[0]
    assert (status, body, headers["content-length"]) == (201, b"abcdef", "6")


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified", "101 Switching Protocols"])
@pytest.mark.parametrize("body", [[], [b""], iter([b"", b""])])
def test_no_framing_fields_added_to_bodiless_statuses(serve, status, body):
    # RFC 9110 8.6: no Content-Length on 1xx and 204; a 304 has no content either
    def app(environ, start_response):
        start_response(status, [("ETag", '"x"')])
        return body
    server = serve(app)
    raw = exchange(server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.0\r\nConnection: close\r\n\r\n")
    heads = raw.split(b"\r\n\r\n")
    assert len(heads) == 3 and heads[2] == b""  # two heads, no body bytes: the first kept the connection
    for head in heads[:2]:
        assert head.startswith(b"HTTP/1.1 " + status.encode()) and b'ETag: "x"' in head
        assert b"Content-Length" not in head and b"Transfer-Encoding" not in head


def test_head_and_empty_200_still_get_content_length(serve):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"abc" if environ["PATH_INFO"] == "/abc" else b""]
    server = serve(app)
    got = responses(exchange(server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
                             b"GET /abc HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert [(s, h["content-length"], b) for s, h, b in got] == [(200, "0", b""), (200, "3", b"abc")]
    raw = exchange(server.port, b"HEAD /abc HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert b"Content-Length: 3\r\n" in raw and raw.endswith(b"\r\n\r\n")


@pytest.fixture
def restore_logging():
    """configure_logging() changes process-wide loggers: put them back after the test."""
    loggers = [logging.getLogger("minipub." + name) for name in ("error", "access")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        for handler in lg.handlers[:]:
            lg.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


@pytest.mark.parametrize("fmt", ["common", "combined"])
def test_access_log_format_is_the_same_for_every_server(serve, tmp_path, restore_logging, fmt):
    log = tmp_path / "access.log"
    minipub.configure_logging(minipub.make_config({"log.screen": False, "log.access_file": str(log),
                                                   "log.access_format": fmt}))
    ports = [serve(hello_app).port, serve(hello_app, config={"log.access_format": "common"}).port]
    for port in ports:
        exchange(port, b'GET /a"b HTTP/1.1\r\nHost: a\r\nReferer: http://r/\r\n'
                       b'User-Agent: ag"ent \xe9\r\nConnection: close\r\n\r\n')
    assert wait_until(lambda: log.read_text().count("\n") == 2)
    for line in log.read_text().splitlines():
        assert re.fullmatch(r'127\.0\.0\.1 - - \[[^]]+\] "GET /a\\"b HTTP/1\.1" 200 6' +
                            (r' "http://r/" "ag\\"ent \\xe9"' if fmt == "combined" else ""), line), line


@pytest.mark.parametrize("status,headers", [
    ("200 OK\r\nX-Injected: 1", []),
    ("200 OK", [("X-A", "a\r\nX-Injected: 1")]),
    ("200 OK", [("X-A", "a\nb")]),
    ("200 OK", [("X-A", "a\x00b")]),
    ("200 OK", [("X A", "a")]),
    ("200 OK", [("Connection", "close")]),
    ("200 OK", [("Transfer-Encoding", "chunked")]),
    ("OK", []),
])
def test_start_response_refuses_unsafe_fields(serve, status, headers):
    def app(environ, start_response):
        start_response(status, headers)
        return [b"never"]
    server = serve(app)
    raw = exchange(server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 500 ") and b"X-Injected" not in raw and b"never" not in raw


def test_application_is_valid_wsgi():
    class Root:
        @minipub.expose
        def index(self):
            return "hi"

        @minipub.expose
        def stream(self):
            yield "a"
            yield b"b"
    app = minipub.Application(Root())
    assert call_app(app)[::2] == (200, b"hi")
    assert call_app(app, path="/stream")[::2] == (200, b"ab")
    assert call_app(app, path="/missing")[0] == 404


@pytest.fixture
def minipub_logs():
    """Records of minipub's error (WARNING and up) and access loggers, whatever configure_logging did."""
    records, loggers = [], [(logging.getLogger("minipub.error"), logging.WARNING),
                            (logging.getLogger("minipub.access"), logging.INFO)]
    handlers = []
    for logger, level in loggers:
        handler = logging.Handler(level)
        handler.emit = records.append
        handlers.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(min(level, logger.level or level))
    yield records
    for logger, handler, level in handlers:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_a_file_that_shrinks_while_sent_closes_and_logs_the_real_count(serve, tls, tmp_path, minipub_logs,
                                                                       secure):
    path = tmp_path / "rotating.log"
    path.write_bytes(b"x" * 2000000)

    def app(environ, start_response):
        f = open(str(path), "rb")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2000000")])
        os.truncate(str(path), 300000)  # rotated between the stat and the send
        return environ["wsgi.file_wrapper"](f)
    tls = tls if secure else None
    server = serve(app, **(_tls_options(tls) if secure else {}))
    with _connect(server.port, tls) as sock:
        sock.sendall(b"GET /log HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: only a close ends the wait
        raw, closed = recv_until_close(sock, timeout=5)
    assert closed and len(raw.partition(b"\r\n\r\n")[2]) == 300000
    messages = [r.getMessage() for r in minipub_logs]
    assert "/log: the file ended after 300000 of 2000000 bytes; connection closed" in messages
    assert [m for m in messages if m.endswith('"GET /log HTTP/1.1" 200 300000')]


# ===========================================================================
# Application and dispatch
# ===========================================================================

class Node:
    @minipub.expose
    def index(self):
        return "node index"


@minipub.expose
class Items:
    def GET(self, id=None):
        return "get %s" % id

    def POST(self, name):
        return "post %s" % name


class DispatchRoot:
    sub = Node()
    items = Items()

    @minipub.expose
    def index(self):
        return "root"

    @minipub.expose
    def project(self, id, *args, **kwargs):
        return "project %s %r %r" % (id, args, sorted(kwargs.items()))

    @minipub.expose
    def report_xml(self):
        minipub.response.headers["Content-Type"] = "application/xml"
        return "<r/>"

    @minipub.expose
    def exact(self, a, b=None):
        return "exact %s %s" % (a, b)

    @minipub.expose
    def raises_typeerror(self):
        return len(None)

    @minipub.expose
    def info(self, **kwargs):
        r = minipub.request
        return {"method": r.method, "path": r.path, "qs": r.query_string, "ua": r.headers.get("user-agent"),
                "base": r.base, "scheme": r.scheme, "cookies": r.cookies, "params": r.params}

    @minipub.expose
    def cookie(self):
        minipub.response.set_cookie("sid", "abc")
        return ""

    @minipub.expose
    def go(self, to):
        raise minipub.HTTPRedirect(to)

    @minipub.expose
    def teapot(self, what=""):
        raise minipub.HTTPError(418, "no <b>%s</b>" % what)

    @minipub.expose
    def raw(self):
        return b"\x00\x01"

    @minipub.expose
    def nothing(self):
        return None

    @minipub.expose
    def lines(self):
        return ("line %d\n" % i for i in range(3))

    @minipub.expose
    def a_file(self):
        return open(__file__, "rb")

    def hidden(self):
        return "never"

    def _print(self):
        return "print works"
    _print.exposed = True


setattr(DispatchRoot, "print", DispatchRoot._print)


class Deep:
    @minipub.expose
    def default(self, *args, **kwargs):
        return "default %r %r" % (args, sorted(kwargs.items()))


DispatchRoot.deep = Deep()
DISPATCH = minipub.Application(DispatchRoot())


@pytest.mark.parametrize("path,query,status,body", [
    ("/", "", 200, b"root"),
    ("/project/123/456/789", "x=blah", 200, b"project 123 ('456', '789') [('x', 'blah')]"),
    ("/project/1", "x=1&x=2", 200, b"project 1 () [('x', ['1', '2'])]"),
    ("/project", "", 404, None),                         # missing positional
    ("/exact/1/2", "", 200, b"exact 1 2"),
    ("/exact/1/2/3", "", 404, None),                     # extra positional
    ("/exact/1", "c=3", 404, None),                      # unexpected query parameter
    ("/exact/1", "a=2", 404, None),                      # given twice
    ("/exact", "a=1&b=2", 200, b"exact 1 2"),
    ("/report.xml", "", 200, b"<r/>"),                   # punctuation maps to _
    ("/print", "", 200, b"print works"),                 # a reserved word bound with setattr
    ("/hidden", "", 404, None),                          # not exposed
    ("/_print", "", 404, None),                          # private names are never reachable
    ("/__init__", "", 404, None),
    ("/sub/", "", 200, b"node index"),
    ("/deep/a/b", "k=v", 200, b"default ('a', 'b') [('k', 'v')]"),
    ("/deep", "", 200, b"default () []"),
    ("/nowhere", "", 404, None),
    ("/raises_typeerror", "", 500, None),                # TypeError inside a handler is a 500
    ("/items", "", 200, b"get None"),
    ("/items/7", "", 200, b"get 7"),
    ("/nothing", "", 200, b""),
])
def test_dispatch(path, query, status, body):
    got_status, headers, got_body = call_app(DISPATCH, path=path, query=query)
    assert got_status == status
    if body is not None:
        assert got_body == body


def test_dispatch_index_redirects_to_trailing_slash_keeping_query():
    status, headers, _ = call_app(DISPATCH, path="/sub", query="a=1")
    assert status == 301 and headers["location"] == "http://127.0.0.1/sub/?a=1"


def test_dispatch_body_params_mismatch_is_400():
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert call_app(DISPATCH, "POST", "/exact", body=b"a=1&b=2", headers=form)[2] == b"exact 1 2"
    assert call_app(DISPATCH, "POST", "/exact", body=b"a=1&zz=2", headers=form)[0] == 400
    assert call_app(DISPATCH, "POST", "/items", body=b"name=n", headers=form)[2] == b"post n"


def test_tools_refuse_before_method_dispatch_answers():
    @minipub.auth_basic("r", users={"u": "p"})
    @minipub.expose
    class Secret:
        def GET(self):
            return "secret"

    class Root:
        secret = Secret()
    app = minipub.Application(Root())
    assert call_app(app, "DELETE", "/secret")[0] == 401  # not a 405 that tells which methods exist
    creds = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    assert call_app(app, "DELETE", "/secret", headers=creds)[0] == 405
    assert call_app(app, "GET", "/secret", headers=creds)[2] == b"secret"


def test_method_dispatch_405_and_head():
    status, headers, _ = call_app(DISPATCH, "DELETE", "/items")
    assert status == 405 and headers["allow"] == "GET, HEAD, POST"
    assert call_app(DISPATCH, "HEAD", "/items")[0] == 200


def test_return_values_and_content_types():
    assert call_app(DISPATCH, path="/")[1]["content-type"] == "text/html; charset=utf-8"
    assert call_app(DISPATCH, path="/report.xml")[1]["content-type"] == "application/xml"
    status, headers, body = call_app(DISPATCH, path="/raw")
    assert (headers["content-type"], body) == ("application/octet-stream", b"\x00\x01")
    assert call_app(DISPATCH, path="/lines")[2] == b"line 0\nline 1\nline 2\n"
    with open(__file__, "rb") as f:
        assert call_app(DISPATCH, path="/a_file")[2] == f.read()
    import json
    info = json.loads(call_app(DISPATCH, path="/info", query="q=1",
                               headers={"User-Agent": "t", "Cookie": "a=1; b=\"2\""})[2])
    assert info == {"method": "GET", "path": "/info", "qs": "q=1", "ua": "t", "base": "http://127.0.0.1",
                    "scheme": "http", "cookies": {"a": "1", "b": "2"}, "params": {"q": "1"}}


def test_cookies_default_to_httponly_samesite_lax():
    assert call_app(DISPATCH, path="/cookie")[1]["set-cookie"] == "sid=abc; Path=/; HttpOnly; SameSite=Lax"


def test_errors_escape_reflected_input_and_hide_tracebacks():
    status, headers, body = call_app(DISPATCH, path="/teapot", query="what=<script>")
    assert status == 418 and b"no &lt;b&gt;&lt;script&gt;&lt;/b&gt;" in body and b"<script>" not in body
    assert headers["x-content-type-options"] == "nosniff"
    status, _, body = call_app(DISPATCH, path="/raises_typeerror")
    assert status == 500 and b"Traceback" not in body
    verbose = minipub.Application(DispatchRoot(), {"request.show_tracebacks": True})
    assert b"Traceback" in call_app(verbose, path="/raises_typeerror")[2]


@pytest.mark.parametrize("target,location", [
    ("/x", "http://127.0.0.1/x"),
    ("y", "http://127.0.0.1/y"),
    ("https://other.example/z", "https://other.example/z"),
    ("//evil.example/p", "http://evil.example/p"),
    ("/\\evil.example/p", "http://evil.example/p"),
    ("/日本?q=é", "http://127.0.0.1/%E6%97%A5%E6%9C%AC?q=%C3%A9"),
])
def test_redirects_are_absolute(target, location):
    status, headers, _ = call_app(DISPATCH, path="/go", query="to=" + urllib.request.quote(target))
    assert (status, headers["location"]) == (303, location)


def test_request_objects_are_per_thread(serve):
    class Root:
        @minipub.expose
        def index(self, n):
            time.sleep(0.01)  # overlap with the other threads' requests
            return minipub.request.params["n"]
    server = serve(minipub.Application(Root()))
    results = {}

    def get(n):
        url = "http://127.0.0.1:%d/?n=%d" % (server.port, n)
        results[n] = urllib.request.urlopen(url, timeout=5).read()
    threads = [threading.Thread(target=get, args=(n,)) for n in range(8)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert results == {n: str(n).encode() for n in range(8)}


def test_quickstart_style_script_name_mount():
    app = minipub.Application(DispatchRoot(), script_name="/app")
    assert call_app(app, path="/app/report.xml")[2] == b"<r/>"
    assert call_app(app, path="/other")[0] == 404


# -- virtual hosts and proxies -------------------------------------------------


class _Site:
    """A tiny tree that says which site answered and what it saw."""

    def __init__(self, name):
        self.name = name

    @minipub.expose
    def index(self):
        return self.name

    @minipub.expose
    def whoami(self):
        r = minipub.request
        return "%s %s %s %s %s" % (self.name, r.remote_addr, r.scheme, r.base, r.environ["wsgi.url_scheme"])

    @minipub.expose
    def go(self):
        raise minipub.HTTPRedirect("/target")


class _Api(_Site):
    @minipub.expose
    def secret(self):
        return "api secret"


def _vhost(**options):
    return minipub.VirtualHost(default=_Site("main"), domains={
        "www.example.com": _Site("www"), "API.example.com": _Api("api"),
        "admin.example.com:8443": _Site("admin")}, **options)


def call_from(app, remote, path="/", scheme="http", headers=None):
    """call_app from peer ``remote`` over ``scheme``."""
    extra = {"REMOTE_ADDR": remote, "wsgi.url_scheme": scheme}
    if "Host" not in (headers or {}):
        extra["HTTP_HOST"] = None
    return call_app(app, path=path, headers=headers, environ=extra)


@pytest.mark.parametrize("host, scheme, expected", [
    ("www.example.com", "http", b"www"), ("WWW.Example.COM", "http", b"www"),
    ("www.example.com.", "http", b"www"), ("www.example.com:80", "http", b"www"),
    ("www.example.com:443", "https", b"www"), ("www.example.com:8080", "http", b"www"),
    ("api.example.com", "http", b"api"), ("Api.Example.Com.:80", "http", b"api"),
    ("admin.example.com:8443", "http", b"admin"), ("ADMIN.example.com.:8443", "https", b"admin"),
    ("admin.example.com", "http", b"main"), ("admin.example.com:443", "https", b"main"),
    ("other.example.com", "http", b"main"), ("127.0.0.1:8080", "http", b"main"),
])
def test_vhost_host_variations(host, scheme, expected):
    app = minipub.Application(_vhost())
    status, _, body = call_from(app, "192.0.2.9", "/", scheme, {"Host": host})
    assert (status, body) == (200, expected)


def test_vhost_unknown_host_without_default_is_400():
    app = minipub.Application(minipub.VirtualHost(domains={"www.example.com": _Site("www")}))
    assert call_from(app, "192.0.2.9", "/", headers={"Host": "www.example.com"})[2] == b"www"
    assert call_from(app, "192.0.2.9", "/", headers={"Host": "evil.example"})[0] == 400
    assert call_from(app, "192.0.2.9", "/", headers={})[0] == 400  # HTTP/1.0 without Host
    with pytest.raises(ValueError):
        minipub.VirtualHost(domains={"bad host": _Site("x")})


def test_vhost_no_cross_host_path_prefix():
    app = minipub.Application(_vhost())
    assert call_from(app, "192.0.2.9", "/secret", headers={"Host": "api.example.com"})[2] == b"api secret"
    for path in ("/secret", "/api/secret", "/api.example.com/secret", "/domains", "/default/secret",
                 "/_minipub_resolve"):
        assert call_from(app, "192.0.2.9", path, headers={"Host": "www.example.com"})[0] == 404, path


def test_vhost_absolute_form_authority_wins_over_host(serve):
    server = serve(minipub.Application(_vhost()))
    raw = exchange(server.port, b"GET http://API.example.com./secret HTTP/1.1\r\nHost: www.example.com\r\n"
                                b"Connection: close\r\n\r\n")
    assert responses(raw)[0][::2] == (200, b"api secret")
    raw = exchange(server.port, b"GET /secret HTTP/1.1\r\nHost: api.example.com:%d\r\n"
                                b"Connection: close\r\n\r\n" % server.port)
    assert responses(raw)[0][::2] == (200, b"api secret")


def test_vhost_x_forwarded_host_only_when_enabled_and_trusted():
    spoof = {"Host": "www.example.com", "X-Forwarded-Host": "api.example.com"}
    trusted = {"server.trusted_proxies": ("10.0.0.0/8",)}
    # ignored by default, even from a trusted proxy
    assert call_from(minipub.Application(_vhost(), trusted), "10.1.2.3", "/", headers=spoof)[2] == b"www"
    # enabled: honoured from the trusted proxy (default: server.trusted_proxies), not from a client
    app = minipub.Application(_vhost(use_x_forwarded_host=True), trusted)
    assert call_from(app, "10.1.2.3", "/", headers=spoof)[2] == b"api"
    assert call_from(app, "192.0.2.9", "/", headers=spoof)[2] == b"www"
    # VirtualHost's own trusted_proxies replace the server's
    app = minipub.Application(_vhost(use_x_forwarded_host=True, trusted_proxies=["192.0.2.9"]), trusted)
    assert call_from(app, "192.0.2.9", "/", headers=spoof)[2] == b"api"
    assert call_from(app, "10.1.2.3", "/", headers=spoof)[2] == b"www"
    # RFC 7239 host= counts as well
    app = minipub.Application(_vhost(use_x_forwarded_host=True), trusted)
    fwd = {"Host": "backend:8000", "Forwarded": 'for=192.0.2.1;host="admin.example.com:8443"'}
    assert call_from(app, "10.1.2.3", "/", headers=fwd)[2] == b"admin"


@pytest.mark.parametrize("remote, headers, expected", [
    # untrusted peer: every proxy header ignored
    ("192.0.2.9", {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
                   "X-Forwarded-Host": "evil.example"}, "main 192.0.2.9 http http://www.example.com http"),
    ("192.0.2.9", {"Forwarded": "for=6.6.6.6;proto=https"}, "main 192.0.2.9 http http://www.example.com http"),
    # trusted peer: X-Forwarded-*; the client's own XFF entry (left) cannot spoof
    ("10.0.0.1", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7", "X-Forwarded-Proto": "https",
                  "X-Forwarded-Host": "pub.example"}, "main 198.51.100.7 https https://pub.example http"),
    # a chain of trusted proxies is skipped from the right
    ("10.0.0.1", {"X-Forwarded-For": "198.51.100.7, 10.9.9.9"}, "main 198.51.100.7 http http://www.example.com http"),
    # RFC 7239: quoted IPv6 with port, proto and host from the outermost trusted proxy's element
    ("10.0.0.1", {"Forwarded": 'for=6.6.6.6;proto=http, for="[2001:db8:cafe::17]:4711";proto=HTTPS;'
                               'host="pub.example:8443", for=10.2.2.2;proto=http'},
     "main 2001:db8:cafe::17 https https://pub.example:8443 http"),
    # Forwarded wins over X-Forwarded-*
    ("10.0.0.1", {"Forwarded": "for=198.51.100.7", "X-Forwarded-For": "6.6.6.6"},
     "main 198.51.100.7 http http://www.example.com http"),
    # an IPv4-mapped peer address from a dual-stack socket is still the trusted proxy
    ("::ffff:10.0.0.1", {"X-Forwarded-For": "198.51.100.7"}, "main 198.51.100.7 http http://www.example.com http"),
])
def test_forwarded_headers_only_from_trusted_proxies(remote, headers, expected):
    app = minipub.Application(_Site("main"), {"server.trusted_proxies": ("10.0.0.0/8",)})
    status, _, body = call_from(app, remote, "/whoami", headers=dict(headers, Host="www.example.com"))
    assert (status, body.decode()) == (200, expected)


def test_forwarded_malformed_is_logged_and_ignored(caplog):
    app = minipub.Application(_Site("main"), {"server.trusted_proxies": ("10.0.0.1",)})
    for bad in ('for=198.51.100.7;proto=https;proto=http', 'for="198.51.100.7', 'for 198.51.100.7',
                'for=198.51.100.7;proto=gopher', 'for=198.51.100.7;host="a b"'):
        caplog.clear()
        body = call_from(app, "10.0.0.1", "/whoami", headers={"Host": "h", "Forwarded": bad})[2]
        assert body.decode() == "main 10.0.0.1 http http://h http", bad
        assert "ignored proxy headers" in caplog.text, bad


def test_trusted_proxies_parsed_once_and_checked_early():
    assert minipub._trusted_networks(("10.0.0.0/8", "::1")) is minipub._trusted_networks(("10.0.0.0/8", "::1"))
    with pytest.raises(minipub.ConfigError):
        minipub.Application(_Site("main"), {"server.trusted_proxies": ("10.0.0.300",)})
    with pytest.raises(minipub.ConfigError):
        minipub.VirtualHost(trusted_proxies=["not-an-address"])


def test_redirects_use_public_scheme_and_host():
    app = minipub.Application(_Site("main"), {"server.trusted_proxies": ("10.0.0.1",)})
    headers = {"Host": "backend:8000", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "pub.example"}
    status, fields, _ = call_from(app, "10.0.0.1", "/go", headers=headers)
    assert (status, fields["location"]) == (303, "https://pub.example/target")
    status, fields, _ = call_from(app, "192.0.2.9", "/go", headers=headers)
    assert (status, fields["location"]) == (303, "http://backend:8000/target")


def _wait_listening(port, proc, what, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError("%s exited: %s" % (what, proc.stderr.read().decode(errors="replace")))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # polling for readiness, bounded by the deadline
    raise AssertionError("%s did not listen on %d within %ss" % (what, port, deadline))


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


NGINX = "/usr/sbin/nginx"


@pytest.fixture
def nginx(tmp_path, tls):
    """nginx(upstream_port, proxy_headers) -> (http_port, https_port) of a real nginx on loopback."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx is not installed at %s" % NGINX)
    procs = []

    def start(upstream, headers):
        ports = free_port(), free_port()
        d = tmp_path / ("nginx%d" % len(procs))
        d.mkdir()
        user = "user root;" if os.geteuid() == 0 else ""  # workers must reach tmp_path (mode 0700)
        temps = "".join("%s_temp_path %s/%s;\n" % (k, d, k) for k in ("client_body", "proxy", "fastcgi",
                                                                       "uwsgi", "scgi"))
        (d / "nginx.conf").write_text("""
daemon off; %s worker_processes 1; pid %s/nginx.pid; error_log %s/error.log;
events { worker_connections 64; }
http {
  access_log off; %s
  server {
    listen 127.0.0.1:%d; listen 127.0.0.1:%d ssl;
    ssl_certificate %s; ssl_certificate_key %s;
    location / { proxy_pass http://127.0.0.1:%d; proxy_http_version 1.1; proxy_redirect off; %s }
  }
}""" % (user, d, d, temps, ports[0], ports[1], tls["fullchain"], tls["leaf_key"], upstream, headers))
        proc = subprocess.Popen([NGINX, "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        for port in ports:
            _wait_listening(port, proc, "nginx")
        return ports
    yield start
    for proc in procs:
        _stop(proc)


def _through(url, tls, *args):
    """curl from 127.0.0.2, so the client address differs from the proxy's 127.0.0.1."""
    out = _curl("--interface", "127.0.0.2", "--cacert", tls["ca"], "-o", "-", "-w", "\n%{http_code} %{redirect_url}",
                *args, url)
    assert out.returncode == 0, out.stderr
    body, _, tail = out.stdout.decode().rpartition("\n")
    return body, tail


def _check_proxied(http_port, https_port, tls):
    body, _ = _through("http://127.0.0.1:%d/whoami" % http_port, tls, "-H", "Host: api.example.com",
                       "-H", "X-Forwarded-For: 6.6.6.6")
    assert body == "api 127.0.0.2 http http://api.example.com http"
    body, _ = _through("https://localhost:%d/whoami" % https_port, tls)
    assert body == "main 127.0.0.2 https https://localhost:%d http" % https_port
    _, tail = _through("https://localhost:%d/go" % https_port, tls)
    assert tail == "303 https://localhost:%d/target" % https_port
    body, _ = _through("https://localhost:%d/secret" % https_port, tls)  # no path into another host's tree
    assert "404" in body


def test_nginx_in_front_of_minipub(serve, nginx, tls):
    app = minipub.Application(_vhost(), {"server.trusted_proxies": ("127.0.0.1",)})
    server = serve(app)
    ports = nginx(server.port, "proxy_set_header Host $http_host; proxy_set_header X-Forwarded-Proto $scheme; "
                               "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;")
    _check_proxied(*ports, tls)
    # the same headers straight from a client (127.0.0.2, not trusted) change nothing
    body, _ = _through("http://127.0.0.1:%d/whoami" % server.port, tls, "-H", "X-Forwarded-For: 6.6.6.6",
                       "-H", "X-Forwarded-Proto: https", "-H", "Host: www.example.com")
    assert body == "www 127.0.0.2 http http://www.example.com http"


def test_nginx_in_front_of_gunicorn(nginx, tls, tmp_path):
    if subprocess.run([sys.executable, "-c", "import gunicorn"], capture_output=True).returncode:
        pytest.skip("gunicorn is not installed (pip install gunicorn)")
    (tmp_path / "proxied_app.py").write_text(
        "import minipub, test_minipub as t\n"
        "application = minipub.Application(t._vhost(use_x_forwarded_host=True),\n"
        "                                  {'server.trusted_proxies': ('127.0.0.1',)})\n")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=HERE)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "--chdir", str(tmp_path),
                             "-b", "127.0.0.1:%d" % port, "proxied_app:application"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(port, proc, "gunicorn")
        # nginx sends its own upstream name as Host; the public one goes in RFC 7239 Forwarded
        ports = nginx(port, 'proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=\\"$http_host\\"";')
        _check_proxied(*ports, tls)
    finally:
        _stop(proc)


# -- HTTPS and binding ---------------------------------------------------------

def _openssl(*args, cwd):
    subprocess.run(("openssl",) + args, cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(cwd, name, cn, issuer, extensions):
    """A P-256 key and certificate ``name``.pem signed by ``issuer`` (self-signed if None)."""
    with open(os.path.join(cwd, name + ".ext"), "w") as f:
        f.write("subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n" + extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + cn, cwd=cwd)
    sign = ("-signkey", name + ".key") if issuer is None else ("-CA", issuer + ".pem", "-CAkey", issuer + ".key")
    _openssl("x509", "-req", "-in", name + ".csr", "-out", name + ".pem", "-days", "2", "-sha256",
             "-set_serial", str(abs(hash(name)) % 10 ** 12 + 1), "-extfile", name + ".ext", *sign, cwd=cwd)


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    """CA -> intermediate -> leaves for localhost and api.example.test, made with the openssl CLI."""
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("the openssl command is not installed")
    d = str(tmp_path_factory.mktemp("tls"))
    ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
    _issue(d, "ca", "minipub test CA", None, ca)
    _issue(d, "int", "minipub test intermediate", "ca", ca.replace("TRUE", "TRUE,pathlen:0"))
    leaf = "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n"
    _issue(d, "leaf", "localhost", "int", leaf % "DNS:localhost,IP:127.0.0.1")
    _issue(d, "api", "api.example.test", "int", leaf % "DNS:api.example.test")
    paths = {name: os.path.join(d, name + ext) for name in ("ca", "int", "leaf", "api") for ext in (".pem",)}
    paths.update({name + "_key": os.path.join(d, name + ".key") for name in ("leaf", "api")})
    with open(os.path.join(d, "fullchain.pem"), "w") as out:
        out.write(open(paths["leaf"]).read() + open(paths["int"]).read())
    paths["fullchain"] = out.name
    return paths


def _tls_options(tls, chain=True):
    return {"ssl_certificate": tls["leaf"], "ssl_private_key": tls["leaf_key"],
            "ssl_certificate_chain": tls["int"] if chain else ""}


def _curl(*args, timeout=20):
    return subprocess.run(("curl", "-sS", "--max-time", "10") + args, capture_output=True, timeout=timeout)


def test_https_curl_verifies_chain_with_intermediate(serve, tls):
    app = minipub.Application(_Site("main"))
    server = serve(app, **_tls_options(tls))
    out = _curl("-v", "--cacert", tls["ca"], "https://localhost:%d/whoami" % server.port)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == "main 127.0.0.1 https https://localhost:%d https" % server.port
    assert b"issuer: CN=minipub test intermediate" in out.stderr
    assert b"ALPN: server accepted http/1.1" in out.stderr
    # control: without the chain file the client cannot link the leaf to the CA
    bare = serve(app, **_tls_options(tls, chain=False))
    out = _curl("--cacert", tls["ca"], "https://localhost:%d/" % bare.port)
    assert out.returncode == 60, out.stderr


def _s_client(port, *args):
    return subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-servername", "localhost",
                           *args], input=b"", capture_output=True, timeout=20)


def test_tls_versions_and_alpn(serve, tls):
    server = serve(hello_app, **_tls_options(tls))
    # SECLEVEL=0 lets the *client* offer TLS 1.1, so the refusal is the server's
    old = _s_client(server.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0 and b"alert protocol version" in old.stderr, old.stderr
    for flag, name in (("-tls1_2", b"TLSv1.2"), ("-tls1_3", b"TLSv1.3")):
        out = _s_client(server.port, flag, "-alpn", "http/1.1", "-showcerts")
        assert out.returncode == 0, out.stderr
        assert b"Protocol  : " + name in out.stdout or b"New, " + name in out.stdout
        assert b"ALPN protocol: http/1.1" in out.stdout
        assert b"1 s:CN = minipub test intermediate" in out.stdout


def test_tls_silent_clients_do_not_stall_others(serve, tls):
    import http.client
    import ssl
    server = serve(hello_app, thread_pool=2, **_tls_options(tls))
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(5)]
    try:
        context = ssl.create_default_context(cafile=tls["ca"])
        started = time.monotonic()
        conn = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=5)
        conn.request("POST", "/", body=b"tls")
        answer = conn.getresponse().read()
        elapsed = time.monotonic() - started
        conn.close()
        assert answer == b"hello tls" and elapsed < 1.0, elapsed
        for sock in idle:  # the silent clients were really held open, waiting for their handshake
            sock.settimeout(0.05)
            with pytest.raises(socket.timeout):
                sock.recv(1)
    finally:
        for sock in idle:
            sock.close()


def test_plain_http_to_tls_port_gets_400(serve, tls, caplog):
    server = serve(hello_app, **_tls_options(tls))
    raw = exchange(server.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ") and b"https://" in raw
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_sni_chooses_the_domain_certificate(serve, tls):
    root = minipub.VirtualHost(default=_Site("main"), domains={
        "api.example.test": (_Site("api"), tls["api"], tls["api_key"], tls["int"])})
    server = serve(minipub.Application(root), **_tls_options(tls))
    resolve = "api.example.test:%d:127.0.0.1" % server.port
    out = _curl("--cacert", tls["ca"], "--resolve", resolve, "https://api.example.test:%d/" % server.port)
    assert (out.returncode, out.stdout) == (0, b"api"), out.stderr
    out = _curl("--cacert", tls["ca"], "https://localhost:%d/" % server.port)
    assert (out.returncode, out.stdout) == (0, b"main"), out.stderr
    out = _s_client(server.port, "-servername", "API.example.test")
    assert b"subject=CN = api.example.test" in out.stdout


def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host, connect_to", [
    ("0.0.0.0", ["127.0.0.1"]), ("::1", ["::1"]), ("::", ["::1", "127.0.0.1"]), ("localhost", ["127.0.0.1"])])
def test_bind_addresses(host, connect_to):
    if ":" in host and not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    if host == "::" and not socket.has_dualstack_ipv6():
        connect_to = ["::1"]
    server = minipub.Server(hello_app, host, 0).start()
    try:
        for addr in connect_to:
            raw = exchange(server.port, b"GET / HTTP/1.0\r\n\r\n") if addr == "127.0.0.1" else None
            if addr == "::1":
                with socket.create_connection(("::1", server.port), timeout=5) as sock:
                    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    raw = sock.recv(65536)
            assert raw.startswith(b"HTTP/1.1 200 "), (host, addr)
        assert server.urls[0].startswith("http://%s:%d/" % ("[%s]" % host if ":" in host else host, server.port))
    finally:
        server.stop(10)


def test_cli_bind_errors_are_one_line_and_status_2():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for args in (["--port", str(busy.getsockname()[1])], ["--host", "192.0.2.1", "--port", "8080"]):
            out = subprocess.run([sys.executable, os.path.join(HERE, "minipub.py"), "examples.hello:Root"] + args,
                                 cwd=HERE, capture_output=True, timeout=30)
            assert out.returncode == 2, out.stderr
            assert out.stderr.decode().count("\n") == 1 and "cannot listen" in out.stderr.decode()
    finally:
        busy.close()


# ===========================================================================
# Configuration levels, hooks and tools (the CherryPy model)
# ===========================================================================

@pytest.fixture
def process_config():
    """minipub.config, restored after the test (it is process-wide, as cherrypy.config)."""
    yield minipub.config
    minipub.config.reset()


def _headers_value(app, path):
    return json.loads(call_app(app, path=path)[2])


class Levels:
    """Each level sets tools.response_headers.headers; the handler reports which one won."""
    @minipub.expose
    def index(self):
        return minipub.request.config["tools.response_headers.headers"]

    class Deeper:
        _cp_config = {"tools.response_headers.headers": [("X-Level", "class")]}

        @minipub.expose
        def index(self):
            return minipub.request.config["tools.response_headers.headers"]

        @minipub.expose
        def own(self):
            return minipub.request.config["tools.response_headers.headers"]
        own._cp_config = {"tools.response_headers.headers": [("X-Level", "handler")]}

        @minipub.expose
        def plain(self):
            return minipub.request.config["tools.response_headers.headers"]
    deeper = Deeper()

    @minipub.expose
    def section(self):
        return minipub.request.config["tools.response_headers.headers"]


def test_config_merge_order_global_app_path_class_handler(process_config):
    process_config.update({"tools.response_headers.headers": [("X-Level", "global")]})
    app = minipub.Application(Levels(), {"/": {"tools.response_headers.headers": [("X-Level", "app")]},
                                         "/section": {"tools.response_headers.headers": [("X-Level", "path")]},
                                         "/deeper/plain": {"tools.response_headers.headers": [["X-Level", "p"]]}})
    assert _headers_value(app, "/") == [["X-Level", "app"]]
    assert _headers_value(app, "/section") == [["X-Level", "path"]]
    assert _headers_value(app, "/deeper/") == [["X-Level", "class"]]        # _cp_config beats a path
    assert _headers_value(app, "/deeper/plain") == [["X-Level", "class"]]   # ... even a deeper one
    assert _headers_value(app, "/deeper/own") == [["X-Level", "handler"]]   # the handler's is last
    assert _headers_value(minipub.Application(Levels()), "/") == [["X-Level", "global"]]
    process_config.update({"tools.response_headers.headers": [("X-Level", "changed")]})  # live, as CherryPy
    assert _headers_value(minipub.Application(Levels()), "/") == [["X-Level", "changed"]]


def test_config_from_an_ini_file_with_path_sections(tmp_path):
    (tmp_path / "public").mkdir()
    (tmp_path / "public" / "a.txt").write_text("from disk")
    ini = tmp_path / "app.conf"
    ini.write_text('[global]\nrequest.show_tracebacks = True\n[/]\ntools.staticdir.root = %r\n'
                   '[/static]\ntools.staticdir.on = True\ntools.staticdir.dir = "public"\n' % str(tmp_path))
    app = minipub.Application(Levels(), str(ini))
    assert app.config["request.show_tracebacks"] is True
    status, headers, body = call_app(app, path="/static/a.txt")
    assert (status, body) == (200, b"from disk") and headers["content-type"] == "text/plain; charset=utf-8"
    assert call_app(app, path="/static/missing.txt")[0] == 404


@pytest.mark.parametrize("make, where", [
    (lambda: minipub.config.update({"tools.sesions.on": True}), r"'tools.sesions.on' in \[global\]"),
    (lambda: minipub.Application(Levels(), {"/": {"tools.gzip.levle": 5}}), r"no argument 'levle'.*\[/\]"),
    (lambda: minipub.Application(Levels(), {"/x": {"server.socket_port": 1}}), r"socket_port.*\[/x\].*global"),
    (lambda: minipub.Application(Levels(), {"/": {"reqest.show_tracebacks": True}}), r"reqest.*\[/\]"),
    (lambda: minipub.Application(Levels(), {"/": {"error_page.999": "x.html"}}), "error_page"),
    (lambda: minipub.Application(Levels(), {"/": {"hooks.before_hander": print}}), "hooks"),
    (lambda: minipub.config.update({"/": {"tools.gzip.on": True}}), "belong to an application"),
])
def test_unknown_config_keys_name_the_key_and_section(process_config, make, where):
    with pytest.raises(minipub.ConfigError, match=where):
        make()


def test_cp_config_typo_fails_at_mount_and_decorator_typo_at_import():
    class Root:
        class Sub:
            _cp_config = {"tools.json_out.onn": True}

            @minipub.expose
            def index(self):
                return "x"
        sub = Sub()
    with pytest.raises(minipub.ConfigError, match=r"json_out.*onn.*_cp_config of .*Sub"):
        minipub.Application(Root())
    with pytest.raises(TypeError, match="no argument 'cotent_type'"):
        minipub.tools.json_out(cotent_type="x")


def test_hook_points_run_in_order_with_priorities():
    seen = []
    names = ["on_start_resource", "before_request_body", "before_handler", "before_finalize",
             "on_end_resource", "on_end_request"]
    for i, point in enumerate(names):
        setattr(minipub.tools, "rec_%d" % i, minipub.Tool(point, lambda point=point, tag="": seen.append(point + tag)))
    minipub.tools.early = minipub.Tool("before_handler", lambda: seen.append("early"), priority=10)

    class Root:
        _cp_config = dict([("tools.rec_%d.on" % i, True) for i in range(len(names))] + [("tools.early.on", True)])

        @minipub.expose
        def index(self):
            seen.append("handler")
            return "ok"
    assert call_app(minipub.Application(Root()))[2] == b"ok"
    assert seen == names[:2] + ["early", "before_handler", "handler"] + names[3:]
    seen.clear()
    Root.boom = minipub.expose(lambda self: 1 / 0)
    minipub.tools.err1 = minipub.Tool("before_error_response", lambda: seen.append("before_error"))
    minipub.tools.err2 = minipub.Tool("after_error_response", lambda: seen.append("after_error"))
    Root._cp_config.update({"tools.err1.on": True, "tools.err2.on": True})
    assert call_app(minipub.Application(Root()), path="/boom")[0] == 500
    assert seen[:5] == names[:2] + ["early", "before_handler", "before_error"]
    assert "after_error" in seen and seen[-1] == "on_end_request"


def test_a_tool_used_three_ways_and_a_custom_tool_with_arguments():
    def stamp(value="x"):
        minipub.response.headers["X-Stamp"] = value
    minipub.tools.stamp = minipub.Tool("before_finalize", stamp)

    class Root:
        @minipub.expose
        @minipub.tools.stamp(value="decorator")
        def deco(self):
            return "d"

        @minipub.expose
        def conf(self):
            return "c"

        class Sub:
            _cp_config = {"tools.stamp.on": True, "tools.stamp.value": "cp_config"}

            @minipub.expose
            def index(self):
                return "s"
        sub = Sub()
    app = minipub.Application(Root(), {"/conf": {"tools.stamp.on": True, "tools.stamp.value": "config"}})
    assert call_app(app, path="/deco")[1]["x-stamp"] == "decorator"
    assert call_app(app, path="/conf")[1]["x-stamp"] == "config"
    assert call_app(app, path="/sub/")[1]["x-stamp"] == "cp_config"


class JsonApi:
    @minipub.expose
    @minipub.tools.json_in()
    @minipub.tools.json_out()
    def echo(self):
        return {"got": minipub.request.json}

    @minipub.expose
    @minipub.tools.json_out()
    def missing(self):
        raise minipub.NotFound("No such book.")

    @minipub.expose
    @minipub.tools.accept(media="text/plain")
    def plain(self):
        return "plain"

    @minipub.expose
    @minipub.tools.allow(methods=["POST"])
    def post_only(self):
        return "posted"


def test_json_in_and_json_out_tools():
    app = minipub.Application(JsonApi())
    post = {"Content-Type": "application/json"}
    status, headers, body = call_app(app, "POST", "/echo", body=b'{"a": [1, 2]}', headers=post)
    assert status == 200 and json.loads(body) == {"got": {"a": [1, 2]}} and headers["content-type"] == "application/json"
    assert call_app(app, "POST", "/echo", body=b'{"a": ', headers=post)[0] == 400
    assert call_app(app, "POST", "/echo", body=b"a=1", headers={"Content-Type": "text/plain"})[0] == 415
    status, headers, body = call_app(app, path="/missing")  # a json_out handler's errors are JSON
    assert status == 404 and json.loads(body) == {"status": 404, "message": "No such book."}


def test_json_errors_follow_the_accept_header():
    app = minipub.Application(DispatchRoot())
    status, headers, body = call_app(app, path="/nowhere", headers={"Accept": "application/json"})
    assert status == 404 and headers["content-type"] == "application/json" and json.loads(body)["status"] == 404
    browser = "text/html,application/xhtml+xml,application/json;q=0.9,*/*;q=0.8"
    assert call_app(app, path="/nowhere", headers={"Accept": browser})[1]["content-type"].startswith("text/html")
    status, headers, body = call_app(minipub.Application(JsonApi()), "GET", "/post_only",
                                     headers={"Accept": "application/json"})
    assert status == 405 and headers["allow"] == "POST" and json.loads(body)["status"] == 405


def test_accept_allow_response_headers_and_expires_tools():
    app = minipub.Application(JsonApi())
    assert call_app(app, path="/plain", headers={"Accept": "text/*"})[2] == b"plain"
    status, _, body = call_app(app, path="/plain", headers={"Accept": "application/json"})
    assert status == 406 and b"text/plain" in body
    assert call_app(app, "POST", "/post_only")[2] == b"posted"
    conf = {"/": {"tools.response_headers.on": True, "tools.response_headers.headers": [("X-Frame-Options", "DENY")],
                  "tools.expires.on": True, "tools.expires.secs": 60}}
    headers = call_app(minipub.Application(DispatchRoot(), conf), path="/")[1]
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "max-age=60" and "expires" in headers


def test_gzip_tool_negotiates_streams_and_leaves_small_or_compressed_bodies():
    class Root:
        @minipub.expose
        def big(self):
            minipub.response.headers["ETag"] = '"v1"'
            return ("line %d\n" % i for i in range(20000))  # generated: never held whole

        @minipub.expose
        def small(self):
            return "tiny"

        @minipub.expose
        def png(self):
            minipub.response.headers["Content-Type"] = "image/png"
            return b"\x89PNG" * 1000
    app = minipub.Application(Root(), {"/": {"tools.gzip.on": True}})
    status, headers, body = call_app(app, path="/big", headers={"Accept-Encoding": "br;q=1, gzip;q=0.5"})
    assert headers["content-encoding"] == "gzip" and headers["vary"] == "Accept-Encoding"
    assert headers["etag"] == 'W/"v1"' and "content-length" not in headers
    assert zlib.decompress(body, 31) == "".join("line %d\n" % i for i in range(20000)).encode()
    refused = call_app(app, path="/big", headers={"Accept-Encoding": "gzip;q=0, *;q=1"})[1]
    assert "content-encoding" not in refused and refused["vary"] == "Accept-Encoding"
    assert "content-encoding" not in call_app(app, path="/small", headers={"Accept-Encoding": "gzip"})[1]
    assert "content-encoding" not in call_app(app, path="/png", headers={"Accept-Encoding": "gzip"})[1]


def test_encode_trailing_slash_and_proxy_tools():
    class Root:
        @minipub.expose
        def index(self):
            return "é"

        @minipub.expose
        def page(self):
            return minipub.url("/next")

        class Sub:
            @minipub.expose
            def index(self):
                return "sub"
        sub = Sub()
    app = minipub.Application(Root(), {"/": {"tools.encode.on": True, "tools.encode.encoding": "latin-1"}})
    status, headers, body = call_app(app)
    assert body == "é".encode("latin-1") and headers["content-type"] == "text/html; charset=latin-1"
    assert call_app(app, path="/sub")[1]["location"] == "http://127.0.0.1/sub/"  # on by default
    off = minipub.Application(Root(), {"/sub": {"tools.trailing_slash.on": False}})
    assert call_app(off, path="/sub")[2] == b"sub"
    extra = minipub.Application(Root(), {"/": {"tools.trailing_slash.extra": True}})
    assert call_app(extra, path="/page/")[1]["location"] == "http://127.0.0.1/page"
    proxied = minipub.Application(Root(), {"/": {"tools.proxy.on": True, "tools.proxy.base": "https://example.org"}})
    assert call_app(proxied, path="/page")[2] == b"https://example.org/next"


class Rest:
    exposed = True

    def GET(self):
        return "got"

    def PUT(self, value):
        return None


def test_method_dispatcher_selects_methods_and_sends_allow():
    class Root:
        @minipub.expose
        def index(self):
            return "home"
        items = Rest()
    app = minipub.Application(Root(), {"/items": {"request.dispatch": minipub.dispatch.MethodDispatcher()}})
    status, headers, body = call_app(app, path="/items")
    assert (status, body, headers["allow"]) == (200, b"got", "GET, HEAD, PUT")
    status, headers, body = call_app(app, "PUT", "/items", query="value=1")
    assert status == 200 and body == b"" and headers["allow"] == "GET, HEAD, PUT"
    assert call_app(app, "DELETE", "/items")[:2][0] == 405
    assert "allow" not in call_app(app, path="/")[1]


def test_error_pages_from_a_file_a_callable_and_error_response(tmp_path):
    page = tmp_path / "403.html"
    page.write_text("<h2>No!</h2><p>%(message)s</p><pre>%(traceback)s</pre>%(status)s")

    class Root:
        @minipub.expose
        def forbidden(self):
            raise minipub.HTTPError(403, "<b>not you</b>")

        @minipub.expose
        def boom(self):
            raise RuntimeError("x")
    app = minipub.Application(Root(), {"/": {"error_page.403": str(page),
                                             "error_page.default": lambda status, message, traceback, version:
                                             "default %s %s" % (status, version)}})
    status, headers, body = call_app(app, path="/forbidden")
    assert status == 403 and body == b"<h2>No!</h2><p>&lt;b&gt;not you&lt;/b&gt;</p><pre></pre>403 Forbidden"
    assert call_app(app, path="/nowhere")[2] == ("default 404 Not Found %s" % minipub.__version__).encode()

    def custom():
        minipub.response.status = 503
        minipub.response.body = "custom error response"
    status, _, body = call_app(minipub.Application(Root(), {"/": {"request.error_response": custom}}), path="/boom")
    assert (status, body) == (503, b"custom error response")


def test_default_error_page_explains_and_mismatch_messages_name_parameters():
    class Root:
        @minipub.expose
        def upload(self, upload):
            return "x"
    app = minipub.Application(Root())
    status, headers, body = call_app(app, path="/upload")
    assert status == 404 and b"Missing parameters: upload" in body and b"<style>" in body
    assert headers["x-content-type-options"] == "nosniff"
    assert b"Unexpected query string parameters: utm_source" in call_app(app, path="/upload?upload=1&utm_source=x")[2]
    status, _, body = call_app(app, "POST", "/upload", body=b"upload=1&x=<b>",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and b"Unexpected body parameters: x" in body
    assert b"Nothing matches the given URI" in call_app(app, path="/nowhere")[2]


def test_redirects_url_and_tree_with_several_apps_and_a_graft(process_config):
    class Admin:
        @minipub.expose
        def index(self):
            return "admin " + minipub.request.script_name

        @minipub.expose
        def go(self):
            raise minipub.HTTPRedirect([minipub.url("/")])

        @minipub.expose
        def where(self):
            return minipub.url("x", qs={"a": 1})
    tree = minipub.Tree()
    tree.mount(Admin(), "/admin")
    tree.mount(DispatchRoot(), "/")
    def plain_wsgi(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["SCRIPT_NAME"].encode() + b"|" + environ["PATH_INFO"].encode()]
    tree.graft(plain_wsgi, "/wsgi")
    assert call_app(tree, path="/admin/")[2] == b"admin /admin"
    status, headers, _ = call_app(tree, path="/admin/go")
    assert status == 303 and headers["location"] == "http://127.0.0.1/admin/"
    assert call_app(tree, path="/admin/where")[2] == b"http://127.0.0.1/admin/x?a=1"
    assert call_app(tree, path="/wsgi/x")[2] == b"/wsgi|/x"
    assert call_app(tree, path="/report.xml")[2] == b"<r/>"


def test_text_mode_file_is_served_with_a_guessed_type(serve, tmp_path):
    (tmp_path / "index.html").write_text("<p>hi</p>\n")

    class Root:
        @minipub.expose
        def index(self):
            return open(str(tmp_path / "index.html"))
    server = serve(minipub.Application(Root()))
    with urllib.request.urlopen("http://127.0.0.1:%d/" % server.port, timeout=5) as answer:
        assert answer.read() == b"<p>hi</p>\n" and answer.headers["Content-Type"] == "text/html; charset=utf-8"


def test_304_and_204_carry_no_content_type():
    class Root:
        @minipub.expose
        def empty(self):
            minipub.response.status = 204
    assert "content-type" not in call_app(minipub.Application(Root()), path="/empty")[1]


def test_global_config_update_at_run_time_and_server_attributes(process_config):
    class Root:
        @minipub.expose
        def index(self):
            return str(minipub.request.show_tracebacks)
    app = minipub.Application(Root())
    assert call_app(app)[2] == b"False"
    process_config.update({"request.show_tracebacks": True})  # as CherryPy's tutorial 10 toggles it
    assert call_app(app)[2] == b"True"
    minipub.server.socket_port = 9999
    assert minipub.config["server.socket_port"] == 9999 and minipub.server.thread_pool == 10
    with pytest.raises(minipub.ConfigError):
        minipub.server.thread_pool = "many"


def test_cherrypy_import_paths_resolve_in_the_one_file():
    from minipub.lib import static, auth_basic, auth_digest
    from minipub.test import helper
    assert static.serve_file is minipub.serve_file and callable(static.serve_download)
    check = auth_basic.checkpassword_dict({"ann": "pw"})
    assert check("r", "ann", "pw") and not check("r", "ann", "no")
    assert auth_digest.get_ha1_dict_plain({"ann": "pw"})("r", "ann") == hashlib.md5(b"ann:r:pw").hexdigest()
    assert issubclass(helper.CPWebCase, __import__("unittest").TestCase)


from minipub.test import helper as _helper  # noqa: E402 - CherryPy's pytest tutorial, as written


class TestCherryPyHelper(_helper.CPWebCase):
    @staticmethod
    def setup_server():
        class StringGenerator:
            @minipub.expose
            def index(self):
                return "Hello world!"

            @minipub.expose
            def echo(self, message):
                return message
        minipub.tree.mount(StringGenerator(), "/", {})

    def test_index(self):
        self.getPage("/")
        self.assertStatus("200 OK")
        self.assertHeader("Content-Type", "text/html; charset=utf-8")
        self.assertBody("Hello world!")

    def test_non_utf8_query_is_another_url(self):
        self.getPage("/echo?message=A+bient%F4t")
        self.assertStatus("404 Not Found")
        self.getPage("/echo?message=Hello%20world")
        self.assertInBody("Hello world")


def test_engine_callbacks_and_a_failing_start_callback(tmp_path):
    (tmp_path / "app.py").write_text(textwrap_dedent('''
        import sys, minipub
        minipub.engine.subscribe("start", lambda: print("started", flush=True))
        minipub.engine.subscribe("stop", lambda: print("stopped", flush=True))
        if "fail" in sys.argv:
            minipub.engine.subscribe("start", lambda: 1 / 0, priority=10)
        class Root:
            @minipub.expose
            def index(self):
                return "up"
        if __name__ == "__main__":
            minipub.quickstart(Root(), config={"global": {"server.socket_port": int(sys.argv[1]), "log.screen": False}})
    '''))
    env = dict(os.environ, PYTHONPATH=HERE)
    failed = subprocess.run([sys.executable, "app.py", str(free_port()), "fail"], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=20)
    assert failed.returncode == 2 and "started" not in failed.stdout, (failed.stdout, failed.stderr)
    assert failed.stderr.strip().count("\n") == 0 and "ZeroDivisionError" in failed.stderr, failed.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", str(port)], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "started\n"
        wait_for_port(port, proc)
        assert urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5).read() == b"up"
        proc.send_signal(signal_module().SIGTERM)
        assert proc.wait(timeout=20) == 0 and proc.stdout.read() == "stopped\n"
    finally:
        proc.kill()


def test_per_path_body_limit_set_response_relative_urls_and_unsubscribe():
    class Root:
        @minipub.expose
        def upload(self, **fields):
            return "ok"

        @minipub.expose
        def teapot(self):
            raise RuntimeError("the real error")

        @minipub.expose
        def deep(self, *args):
            return "|".join([minipub.url("x", relative=True), minipub.url("/y", relative="server"),
                             minipub.url("/y", qs="a=1")])
    app = minipub.Application(Root(), {"/upload": {"server.max_request_body_size": 10}, "/teapot": {
        "request.error_response": minipub.HTTPError(418, "short and stout").set_response}})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert call_app(app, "POST", "/upload", body=b"a=" + b"x" * 20, headers=form)[0] == 413
    assert call_app(app, "POST", "/upload", body=b"a=1", headers=form)[0] == 200
    status, _, body = call_app(app, path="/teapot")
    assert status == 418 and b"short and stout" in body
    assert call_app(app, path="/deep/a/b")[2] == b"x|/y|http://127.0.0.1/y?a=1"
    engine, seen = minipub.Engine(), []
    engine.subscribe("graceful", seen.append)
    engine.subscribe("graceful", lambda *a: seen.append("second"), priority=10)
    engine.graceful()
    engine.unsubscribe("graceful", seen.append)
    engine.graceful()
    assert seen == ["second", "second"] or seen == ["second", (), "second"]


def test_engine_block_makes_no_wake_ups_while_idle(tmp_path):
    (tmp_path / "app.py").write_text(textwrap_dedent('''
        import sys, minipub
        class Root:
            @minipub.expose
            def index(self):
                return "idle"
        minipub.config.update({"server.socket_port": int(sys.argv[1]), "log.screen": False})
        minipub.tree.mount(Root())
        minipub.engine.start()
        print("up", flush=True)
        minipub.engine.block()
    '''))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", str(port)], cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=HERE), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "up\n"
        assert urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5).read() == b"idle"

        def switches():
            total = 0
            for task in os.listdir("/proc/%d/task" % proc.pid):
                with open("/proc/%d/task/%s/status" % (proc.pid, task)) as status:
                    total += sum(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt"))
            return total
        wait_until(lambda: False, timeout=0.3)  # let the watchdog park after the request
        before = switches()
        wait_until(lambda: False, timeout=1.0)
        assert switches() - before <= 2  # no tick: every thread sleeps until something happens
        proc.send_signal(signal_module().SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_engine_start_and_block_serve_the_tree_in_process(process_config, monkeypatch):
    monkeypatch.setattr(minipub, "configure_logging", lambda settings: None)  # leave caplog's loggers be

    class Root:
        @minipub.expose
        def index(self):
            return "tree"
    saved = dict(minipub.tree.apps)
    process_config.update({"server.socket_port": 0, "log.screen": False})
    minipub.tree.mount(Root(), "/")
    events = []
    minipub.engine.subscribe("stop", lambda: events.append("stop"))
    try:
        minipub.engine.start()
        port = minipub.engine.server.port
        assert urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5).read() == b"tree"
        threading.Timer(0.2, minipub.engine.exit).start()
        minipub.engine.block()  # returns once exit() has stopped the server
        assert events == ["stop"] and minipub.engine.state == "EXITED"
    finally:
        minipub.engine = type(minipub.engine)()
        minipub.tree.apps.clear()
        minipub.tree.apps.update(saved)


# -- CherryPy's own tutorials, with only the import line changed ---------------------
# The programs are read from the installed CherryPy package (a test-only dependency; never
# copied here) and run in-process; each expectation was recorded by running the same
# program on CherryPy 18.10.

def _cherrypy_tutorial(name, monkeypatch):
    cherrypy = pytest.importorskip("cherrypy")
    folder = os.path.join(os.path.dirname(cherrypy.__file__), "tutorial")
    source = open(os.path.join(folder, name + ".py"), encoding="utf-8").read()
    source = source.replace("import cherrypy\n", "import minipub as cherrypy\n")
    source = source.replace("from cherrypy.lib import static", "from minipub.lib import static")
    mounted = {}
    monkeypatch.setattr(minipub, "quickstart", lambda root=None, script_name="", config=None:
                        mounted.update(root=root, script_name=script_name, config=config))
    code = compile(source, os.path.join(folder, name + ".py"), "exec")
    exec(code, {"__name__": "__main__", "__file__": os.path.join(folder, name + ".py")})
    tree = minipub.Tree()
    tree.mount(mounted["root"], mounted["script_name"], mounted["config"])
    return minipub.TestClient(tree)


@pytest.mark.parametrize("name, requests", [
    ("tut01_helloworld", [("/", 200, b"Hello world!")]),
    ("tut02_expose_methods", [("/", 200, b"important message"), ("/show_msg", 200, b"Hello world!")]),
    ("tut03_get_and_post", [("/greetUser?name=Bob", 200, b"Hey Bob, what's up?"), ("/greetUser", 200, b"enter your name"),
                            ("/greetUser?name=", 200, b"No, really"), ("/greetUser?x=1", 404, b"x")]),
    ("tut04_complex_site", [("/", 200, b"home page"), ("/joke/", 200, b"Read a Perl file!"), ("/links/extra/", 200, b"extra"),
                            ("/links", 301, b"")]),
    ("tut05_derived_objects", [("/", 200, b"Tutorial 5"), ("/another/", 200, b"Another Page"), ("/another", 301, b"")]),
    ("tut06_default_method", [("/", 200, b"Remi Delon"), ("/remi", 200, b"Remi Delon"), ("/nobody", 200, b"Unknown")]),
    ("tut07_sessions", [("/", 200, b"1 times"), ("/", 200, b"2 times"), ("/", 200, b"3 times")]),
    ("tut08_generators_and_yield", [("/", 200, b"Lorenzo Lamas")]),
    ("tut09_files", [("/", 200, b"Upload a file"), ("/download", 200, b"%PDF")]),
    ("tut10_http_errors", [("/", 200, b"Toggle tracebacks"), ("/error?code=403", 403, b"You can't do that!"),
                           ("/error?code=402", 402, b"402"), ("/messageArg", 500, b"argument"),
                           ("/doesNotExist", 404, b"404")]),
])
def test_cherrypy_tutorials_run_unchanged(name, requests, monkeypatch):
    client = _cherrypy_tutorial(name, monkeypatch)
    try:
        for path, status, text in requests:
            answer = client.get(path)
            assert answer.status == status, (path, answer.status, answer.body[:200])
            assert text in answer.body, (path, answer.body[:300])
            if status == 200 and text != b"%PDF":
                assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    finally:
        minipub.config.reset()


def test_cherrypy_tutorial_files_upload_download_and_error_toggle(monkeypatch):
    client = _cherrypy_tutorial("tut09_files", monkeypatch)
    answer = client.post("/upload", files={"myFile": ("notes.txt", b"x" * 20000, "text/plain")})
    assert answer.status == 200 and b"myFile length: 20000" in answer.body and b"notes.txt" in answer.body
    answer = client.get("/download")
    assert answer.headers["Content-Type"] == "application/x-download"
    assert answer.headers["Content-Disposition"].startswith('attachment; filename="pdf_file.pdf"')
    client = _cherrypy_tutorial("tut10_http_errors", monkeypatch)
    try:
        assert b"<pre></pre>" in client.get("/error?code=403").body  # no traceback by default (see README)
        assert client.get("/toggleTracebacks").status == 303
        assert b"Traceback" in client.get("/error?code=500").body  # CherryPy's global config, toggled at run time
    finally:
        minipub.config.reset()


def test_engine_tasks_sleep_until_due_with_an_injected_clock(caplog):
    clock, ran = FakeClock(), []
    tasks = minipub._Tasks(clock)
    assert tasks.step() is None  # none registered: sleep without a timeout
    tasks.add(60, lambda: ran.append(clock.now))

    def failing():
        ran.append("boom")
        raise ValueError("boom")
    tasks.add(25, failing)
    assert (tasks.step(), ran) == (25.0, [])
    clock.now += 24.5
    assert (tasks.step(), ran) == (0.5, [])  # not early
    clock.now += 0.5
    with caplog.at_level(logging.ERROR, logger="minipub.error"):
        logging.getLogger("minipub.error").propagate = True
        try:
            assert (tasks.step(), ran) == (25.0, ["boom"])
        finally:
            logging.getLogger("minipub.error").propagate = False
    assert "engine task" in caplog.text and "ValueError: boom" in caplog.text
    clock.now += 25.0
    assert (tasks.step(), ran) == (10.0, ["boom", "boom"])  # it keeps going
    clock.now += 10.0
    assert (tasks.step(), ran[-1]) == (15.0, 1060.0)  # every 60 s: once a minute
    clock.now += 1000.0  # a suspended machine: one run each, then the usual period, not a burst
    tasks.step()
    assert ran[-2:] == [2060.0, "boom"] and tasks.step() == 25.0
    with pytest.raises(ValueError):
        tasks.add(0, print)


def test_engine_task_thread_runs_while_started_and_stops_with_the_engine(process_config, monkeypatch):
    monkeypatch.setattr(minipub, "configure_logging", lambda settings: None)  # leave caplog's loggers be
    process_config.update({"server.socket_port": 0, "log.screen": False})
    engine, calls = minipub.Engine(), []
    engine.start()
    try:
        assert "minipub-tasks" not in {t.name for t in threading.enumerate()}  # no task: no thread
        added = time.monotonic()
        engine.task(0.02, lambda: calls.append(time.monotonic()))
        assert wait_until(lambda: len(calls) >= 3, 10)
    finally:
        engine.exit()
    assert "minipub-tasks" not in {t.name for t in threading.enumerate()}
    # Run at their due times, never before (a late run moves the next one later, not sooner): not a spin.
    assert all(at >= added + 0.02 * (i + 1) - 0.002 for i, at in enumerate(calls)), (added, calls)


def textwrap_dedent(text):
    import textwrap
    return textwrap.dedent(text)


def signal_module():
    import signal
    return signal


# ===========================================================================
# Tools: authentication
# ===========================================================================

_HASHES = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
HAS_CURL = shutil.which("curl") is not None


class FakeClock:
    """An injected clock for nonce lifetimes: tests move time instead of sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def auth_app(clock=None, **digest_options):
    """/admin/ (Basic, class), /reports (Digest, handler), /md5 (MD5-first), /public."""
    @minipub.auth_basic("admin area", users={"alice": "s3cret", "jörg": "pässword"})
    class Admin:
        @minipub.expose
        def index(self):
            return "admin " + minipub.request.login

        class Deeper:
            @minipub.expose
            def index(self):
                return "deep " + minipub.request.login
        deeper = Deeper()

    options = dict(users={"bob": "pässword", "jörg": "geheim"}, clock=clock or time.monotonic)
    options.update(digest_options)

    class Root:
        admin = Admin()

        @minipub.expose
        def public(self):
            return "public"

        @minipub.expose
        @minipub.auth_digest("reports", **options)
        def reports(self, x=None):
            return "hello %s%s" % (minipub.request.login, "" if x is None else " x=" + x)

        @minipub.expose
        @minipub.auth_digest("old clients", users={"bob": "pw"}, algorithms=("MD5", "SHA-256"))
        def md5(self):
            return "md5 " + minipub.request.login
    return minipub.Application(Root())


def auth_call(app, path="/reports", auth=None, method="GET", body=b"", headers=None):
    """call_app, keeping every WWW-Authenticate field: (status, [challenges], body)."""
    fields = []

    def spy(environ, start_response):
        def keep(status, headers, exc_info=None):
            fields[:] = headers
            return start_response(status, headers, exc_info)
        return app(environ, keep)
    headers = dict(headers or {})
    if auth is not None:
        headers["Authorization"] = auth
    path, _, query = path.partition("?")
    status, _, data = call_app(spy, method, path, query, body, headers)
    return status, [v for k, v in fields if k.lower() == "www-authenticate"], data


def parse_challenge(value):
    scheme, _, rest = value.partition(" ")
    found = re.findall(r'([\w-]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))', rest)
    return dict((k.lower(), q or t) for k, q, t in found)


def digest(challenge, user="bob", password="pässword", method="GET", uri="/reports", nc=1,
           qop="auth", body=b"", **override):
    """The Authorization value a client computes from ``challenge`` (RFC 7616 3.4.1)."""
    c = parse_challenge(challenge)
    algorithm = override.pop("algorithm", c["algorithm"])

    def h(data):
        data = data.encode("utf-8") if isinstance(data, str) else data
        return hashlib.new(_HASHES[algorithm.upper().replace("-SESS", "")], data).hexdigest()
    cnonce = "0a4f113b"
    ha1 = h("%s:%s:%s" % (user, c["realm"], password))
    if algorithm.upper().endswith("-SESS"):
        ha1 = h("%s:%s:%s" % (ha1, c["nonce"], cnonce))
    a2 = "%s:%s" % (method, uri) + (":" + h(body) if qop == "auth-int" else "")
    params = {"username": user, "realm": c["realm"], "nonce": c["nonce"], "uri": uri,
              "algorithm": algorithm, "qop": qop, "nc": "%08x" % nc, "cnonce": cnonce,
              "opaque": c["opaque"],
              "response": h("%s:%s:%08x:%s:%s:%s" % (ha1, c["nonce"], nc, cnonce, qop, h(a2)))}
    params.update(override)
    text = ", ".join('%s="%s"' % (k, v) for k, v in params.items() if v is not None)
    return ("Digest " + text).encode("utf-8").decode("latin-1")  # what WSGI hands over


def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode("utf-8")).decode("ascii")


def first_challenge(app, path="/reports"):
    status, challenges, _ = auth_call(app, path)
    assert status == 401
    return challenges[0]


def test_auth_basic_protects_class_subtree_and_sets_login():
    app = auth_app()
    status, challenges, _ = auth_call(app, "/admin/")
    assert (status, challenges) == (401, ['Basic realm="admin area", charset="UTF-8"'])
    assert auth_call(app, "/admin/", basic("alice", "s3cret"))[::2] == (200, b"admin alice")
    assert auth_call(app, "/admin/deeper/", basic("alice", "s3cret"))[::2] == (200, b"deep alice")
    assert auth_call(app, "/admin/deeper/", basic("alice", "wrong"))[:2] == (401, challenges)
    assert auth_call(app, "/admin/", basic("nobody", "s3cret"))[0] == 401
    assert auth_call(app, "/admin/", basic("jörg", "pässword"))[::2] == (200, "admin jörg".encode())
    assert auth_call(app, "/public")[0] == 200


def test_auth_basic_checkpassword_gets_realm_user_password():
    calls = []

    @minipub.auth_basic("r", checkpassword=lambda *a: calls.append(a) or a[2] == "pass:with:colons")
    class Root:
        @minipub.expose
        def index(self):
            return minipub.request.environ.get("REMOTE_USER", "") + "/" + minipub.request.login
    app = minipub.Application(Root())
    assert auth_call(app, "/", basic("carol", "pass:with:colons"))[::2] == (200, b"/carol")
    assert auth_call(app, "/", basic("carol", "nope"))[0] == 401
    assert calls == [("r", "carol", "pass:with:colons"), ("r", "carol", "nope")]
    with pytest.raises(TypeError):
        minipub.auth_basic("r")


@pytest.mark.parametrize("header", [
    "Basic", "Basic !!!!", "Basic YWxpY2U", "Basic " + base64.b64encode(b"no colon").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Basic " + base64.b64encode(b"a:b\x01").decode(),
    "Basic YWxpY2U6czNjcmV0 YWxpY2U6czNjcmV0", "Basic " + "," * 10240])
def test_auth_basic_malformed_credentials_are_400(header):
    assert auth_call(auth_app(), "/admin/", header)[0] == 400


@pytest.mark.parametrize("header, status", [
    ("", 401), ("Bearer abc", 401), ("Negotiate", 401), ("Digest", 400), ("Digest ", 400),
    ('Digest username="bob', 400), ('Digest username="bob", realm=', 400),
    ("Digest username=bob realm=reports", 400), ("Digest =x", 400), ("Digest " + "," * 10240, 400),
    ('Digest username="a", Username="b"', 400), ("Digest " + "a=b, " * 40, 400),
    ("Digest " + "a" * 10000 + "=" + '"' * 1000, 400), ('Digest username="\xff"', 400)])
def test_auth_garbage_digest_headers_are_refused_fast(header, status):
    app = auth_app()
    started = time.monotonic()
    assert auth_call(app, "/reports", header)[0] == status
    assert time.monotonic() - started < 1.0  # linear scans: a regex blow-up would take seconds


def test_auth_digest_challenges_one_per_algorithm_preferred_first():
    status, challenges, _ = auth_call(auth_app(), "/reports")
    assert status == 401 and len(challenges) == 2
    first, second = map(parse_challenge, challenges)
    assert (first["algorithm"], second["algorithm"]) == ("SHA-256", "MD5")
    assert first["nonce"] == second["nonce"] and first["realm"] == "reports"
    assert first["qop"] == "auth, auth-int" and first["charset"] == "UTF-8" and first["opaque"]
    assert "stale" not in first and "userhash" not in first
    _, challenges, _ = auth_call(auth_app(), "/md5")
    assert [parse_challenge(c)["algorithm"] for c in challenges] == ["MD5", "SHA-256"]
    with pytest.raises(ValueError):
        minipub.auth_digest("r", users={}, algorithms=("SHA-1",))
    with pytest.raises(TypeError):
        minipub.auth_digest("r", users={}, get_ha1=lambda *a: None)


def test_auth_digest_sha256_response_computed_from_the_challenge():
    app = auth_app()
    challenge = first_challenge(app, "/reports?x=1")
    assert parse_challenge(challenge)["algorithm"] == "SHA-256"
    header = digest(challenge, uri="/reports?x=1")
    assert auth_call(app, "/reports?x=1", header)[::2] == (200, b"hello bob x=1")
    wrong = digest(challenge, password="password", uri="/reports?x=1", nc=2)
    status, challenges, _ = auth_call(app, "/reports?x=1", wrong)
    assert status == 401 and "stale" not in parse_challenge(challenges[0])


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256", "SHA-512-256", "MD5-sess", "SHA-256-sess"])
def test_auth_digest_each_algorithm_with_stored_ha1(algorithm):
    if "sha512_256" not in hashlib.algorithms_available and algorithm.startswith("SHA-512"):
        pytest.skip("this hashlib has no SHA-512/256")
    stored = {}  # what a deployment keeps instead of passwords: H(user:realm:password)
    for name in ("MD5", "SHA-256", "SHA-512-256"):
        if _HASHES[name] in hashlib.algorithms_available:
            stored[name] = hashlib.new(_HASHES[name], "bob:vault:pässword".encode()).hexdigest()
    calls = []

    def get_ha1(realm, user, base_algorithm):
        calls.append((realm, user, base_algorithm))
        return stored[base_algorithm] if user == "bob" else None

    class Root:
        @minipub.expose
        @minipub.auth_digest("vault", get_ha1=get_ha1, algorithms=(algorithm,))
        def index(self):
            return "in " + minipub.request.login
    app = minipub.Application(Root())
    challenge = first_challenge(app, "/")
    assert parse_challenge(challenge)["algorithm"] == algorithm
    assert auth_call(app, "/", digest(challenge, uri="/"))[::2] == (200, b"in bob")
    assert auth_call(app, "/", digest(challenge, user="eve", uri="/", nc=2))[0] == 401
    assert calls == [("vault", "bob", algorithm.replace("-sess", "")),
                     ("vault", "eve", algorithm.replace("-sess", ""))]


def test_auth_digest_replayed_header_is_refused():
    app = auth_app()
    header = digest(first_challenge(app))
    assert auth_call(app, "/reports", header)[0] == 200
    status, challenges, _ = auth_call(app, "/reports", header)
    assert status == 401 and parse_challenge(challenges[0])["stale"] == "true"


def test_auth_digest_nc_out_of_order_accepted_once_each_within_a_window():
    app = auth_app()
    challenge = first_challenge(app)
    for nc, want in [(3, 200), (1, 200), (2, 200), (2, 401), (3, 401), (70, 200), (6, 401),
                     (7, 200), (7, 401), (69, 200), (69, 401), (4000000000, 200), (70, 401)]:
        assert auth_call(app, "/reports", digest(challenge, nc=nc))[0] == want, nc
    assert auth_call(app, "/reports", digest(challenge, nc=0))[0] == 401


def test_auth_digest_uri_must_match_the_request_target():
    app = auth_app()
    challenge = first_challenge(app)
    # CherryPy 18 accepted credentials computed for /public on /secret.
    assert auth_call(app, "/reports", digest(challenge, uri="/public"))[0] == 400
    assert auth_call(app, "/reports?x=1", digest(challenge, uri="/reports"))[0] == 400
    assert auth_call(app, "/reports", digest(challenge, uri="/reports?x=1"))[0] == 400
    assert auth_call(app, "/reports", digest(challenge))[0] == 200


def test_auth_digest_realm_algorithm_opaque_and_forged_nonce_get_a_plain_401():
    app = auth_app()
    challenge = first_challenge(app)
    nonce = parse_challenge(challenge)["nonce"]
    forged = nonce[:20] + ("0" if nonce[20] != "0" else "1") + nonce[21:]
    for header in [digest(challenge, realm="other"), digest(challenge, algorithm="SHA-512-256"),
                   digest(challenge, opaque="00"), digest(challenge, nonce=forged),
                   digest(challenge, nonce=nonce.upper()), digest(challenge, nonce="x")]:
        status, challenges, _ = auth_call(app, "/reports", header)
        assert status == 401 and "stale" not in parse_challenge(challenges[0]), header
    assert auth_call(app, "/reports", digest(challenge, opaque=None))[0] == 200  # SHOULD echo


def test_auth_digest_expired_nonce_is_stale_and_the_retry_succeeds():
    clock = FakeClock()
    app = auth_app(clock=clock, nonce_lifetime=30)
    challenge = first_challenge(app)
    assert auth_call(app, "/reports", digest(challenge))[0] == 200
    clock.now += 31
    status, challenges, _ = auth_call(app, "/reports", digest(challenge, nc=2))
    fresh = parse_challenge(challenges[0])
    assert status == 401 and fresh["stale"] == "true"
    # An expired nonce with a wrong response is not stale: the user must be asked again.
    status, challenges, _ = auth_call(app, "/reports", digest(challenge, password="x", nc=3))
    assert status == 401 and "stale" not in parse_challenge(challenges[0])
    assert auth_call(app, "/reports", digest(challenges[0]))[::2] == (200, b"hello bob")


def test_auth_digest_non_ascii_user_and_password():
    app = auth_app()
    challenge = first_challenge(app)
    assert auth_call(app, "/reports", digest(challenge))[::2] == (200, b"hello bob")
    # A UTF-8 user name inside the quoted string (charset=UTF-8) ...
    status, _, body = auth_call(app, "/reports", digest(challenge, user="jörg", password="geheim", nc=2))
    assert (status, body) == (200, "hello jörg".encode())
    # ... or as username* (RFC 8187), which RFC 7616 3.4.4 asks for.
    header = digest(challenge, user="jörg", password="geheim", nc=3, username=None)
    header += ", username*=UTF-8''j%C3%B6rg"
    assert auth_call(app, "/reports", header)[::2] == (200, "hello jörg".encode())
    both = digest(challenge, user="jörg", password="geheim", nc=4) + ", username*=UTF-8''j%C3%B6rg"
    assert auth_call(app, "/reports", both)[0] == 400
    latin = digest(challenge, nc=5, username=None) + ", username*=ISO-8859-1''j%F6rg"
    assert auth_call(app, "/reports", latin)[0] == 400


def test_auth_digest_userhash():
    app = auth_app(userhash=True)
    challenge = first_challenge(app)
    assert parse_challenge(challenge)["userhash"] == "true"
    hashed = hashlib.sha256(b"bob:reports").hexdigest()
    header = digest(challenge, username=hashed) + ", userhash=true"
    assert auth_call(app, "/reports", header)[::2] == (200, b"hello bob")
    unknown = digest(challenge, nc=2, username=hashlib.sha256(b"eve:reports").hexdigest()) + ", userhash=true"
    assert auth_call(app, "/reports", unknown)[0] == 401
    plain = auth_app()
    offered_not = digest(first_challenge(plain)) + ", userhash=true"
    assert auth_call(plain, "/reports", offered_not)[0] == 400
    with pytest.raises(TypeError):
        minipub.auth_digest("r", get_ha1=lambda *a: None, userhash=True)


def test_auth_digest_auth_int_hashes_the_body_and_leaves_it_to_the_handler():
    @minipub.auth_digest("forms", users={"bob": "pässword"})
    class Root:
        @minipub.expose
        def save(self, title):
            return "%s saved %s" % (minipub.request.login, title)
    app = minipub.Application(Root())
    challenge = first_challenge(app, "/save")
    body = b"title=Dracula"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    header = digest(challenge, method="POST", uri="/save", qop="auth-int", body=body)
    assert auth_call(app, "/save", header, "POST", body, form)[::2] == (200, b"bob saved Dracula")
    header = digest(challenge, method="POST", uri="/save", qop="auth-int", body=body, nc=2)
    assert auth_call(app, "/save", header, "POST", b"title=Carmilla", form)[0] == 401
    header = digest(challenge, method="POST", uri="/save", qop="auth-conf", nc=3)
    assert auth_call(app, "/save", header, "POST", body, form)[0] == 400


def test_auth_digest_replay_table_is_bounded(monkeypatch):
    monkeypatch.setattr(minipub, "_NONCE_TABLE", 3)
    clock = FakeClock()
    app = auth_app(clock=clock)
    first_challenge(app)
    hook = [space for space in minipub._digest_spaces.values() if space.realm == "reports"][-1]
    challenges = []
    for i in range(5):
        clock.now += 1  # nonces issued in order
        challenges.append(first_challenge(app))
        assert auth_call(app, "/reports", digest(challenges[-1]))[0] == 200
        assert len(hook.seen) <= 3
    # The two oldest nonces were forgotten to make room: refused as stale, never replayable.
    for old in challenges[:2]:
        status, fresh, _ = auth_call(app, "/reports", digest(old, nc=2))
        assert status == 401 and parse_challenge(fresh[0])["stale"] == "true"
    assert auth_call(app, "/reports", digest(challenges[-1], nc=2))[0] == 200
    clock.now += 301  # expired entries are dropped as new nonces arrive
    challenge = first_challenge(app)
    assert auth_call(app, "/reports", digest(challenge))[0] == 200 and len(hook.seen) == 1


def test_auth_decorators_return_the_object_and_keep_signature_binding():
    def handler(self, x=None):
        return "x"
    assert minipub.auth_digest("r", users={})(handler) is handler
    assert minipub.auth_basic("r", users={})(handler) is handler
    app = auth_app()
    challenge = first_challenge(app)
    # The hook runs before binding: an unexpected query parameter is still a 404, after auth.
    assert auth_call(app, "/reports?y=1", digest(challenge, uri="/reports?y=1"))[0] == 404
    assert auth_call(app, "/reports?y=1")[0] == 401


# -- real clients ---------------------------------------------------------------

def curl(*args):
    result = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, timeout=20)
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code), body, result.stderr.decode("utf-8", "replace")


@pytest.mark.skipif(not HAS_CURL, reason="curl not installed")
def test_auth_curl_basic_and_digest(serve):
    base = "http://127.0.0.1:%d" % serve(auth_app()).port
    assert curl("--basic", "-u", "alice:s3cret", base + "/admin/")[:2] == (200, b"admin alice")
    assert curl("--basic", "-u", "alice:wrong", base + "/admin/")[0] == 401
    assert curl("--basic", "-u", "jörg:pässword", base + "/admin/")[:2] == (200, "admin jörg".encode())
    # Digest: curl answers the first (SHA-256) challenge, with the UTF-8 bytes of the password.
    code, body, log = curl("-v", "--digest", "-u", "bob:pässword", base + "/reports?x=1")
    assert (code, body) == (200, b"hello bob x=1") and "algorithm=SHA-256" in log
    assert log.count("< WWW-Authenticate: Digest") == 2  # one field per challenge on the wire
    assert curl("--digest", "-u", "bob:password", base + "/reports")[0] == 401
    code, body, log = curl("-v", "--digest", "-u", "bob:pw", base + "/md5")
    assert (code, body) == (200, b"md5 bob") and "algorithm=MD5" in log
    assert curl("--digest", "-u", "jörg:geheim", base + "/reports")[:2] == (200, "hello jörg".encode())


@pytest.mark.parametrize("client", ["curl", "urllib"])
def test_auth_real_clients_retry_after_a_stale_nonce(serve, client):
    if client == "curl" and not HAS_CURL:
        pytest.skip("curl not installed")
    calls = []

    def clock():  # the first nonce is issued at 1000 s; the client "answers" 31 s later
        calls.append(None)
        return 1000.0 if len(calls) == 1 else 1031.0

    class Root:
        @minipub.expose
        @minipub.auth_digest("reports", users={"bob": "pw"}, algorithms=("MD5",), clock=clock,
                             nonce_lifetime=30)
        def reports(self):
            return "hello " + minipub.request.login
    url = "http://127.0.0.1:%d/reports" % serve(minipub.Application(Root())).port
    if client == "curl":
        # curl retries a 401 only when it says stale=true; a wrong password ends at 401.
        code, body, log = curl("-v", "--digest", "-u", "bob:pw", url)
        assert (code, body) == (200, b"hello bob") and "stale=true" in log
        assert log.count("> Authorization: Digest") == 2
    else:
        handler = urllib.request.HTTPDigestAuthHandler()
        handler.add_password("reports", url, "bob", "pw")
        assert urllib.request.build_opener(handler).open(url, timeout=10).read() == b"hello bob"
    assert len(calls) == 4  # nonce, stale check, new nonce, fresh check


def test_auth_urllib_basic_and_md5_first_digest(serve):
    base = "http://127.0.0.1:%d" % serve(auth_app()).port

    def opener(handler_class, realm, user, password):
        handler = handler_class()
        handler.add_password(realm, base, user, password)
        return urllib.request.build_opener(handler)
    basic_ok = opener(urllib.request.HTTPBasicAuthHandler, "admin area", "jörg", "pässword")
    assert basic_ok.open(base + "/admin/", timeout=10).read() == "admin jörg".encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener(urllib.request.HTTPBasicAuthHandler, "admin area", "alice", "x").open(base + "/admin/", timeout=10)
    assert refused.value.code == 401
    digest_ok = opener(urllib.request.HTTPDigestAuthHandler, "old clients", "bob", "pw")
    assert digest_ok.open(base + "/md5", timeout=10).read() == b"md5 bob"
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener(urllib.request.HTTPDigestAuthHandler, "old clients", "bob", "x").open(base + "/md5", timeout=10)
    assert refused.value.code == 401
    # urllib reads only the first challenge and knows MD5 and SHA-1: SHA-256 first defeats it.
    with pytest.raises(ValueError, match="SHA-256"):
        opener(urllib.request.HTTPDigestAuthHandler, "reports", "bob", "pw").open(base + "/reports", timeout=10)


def test_auth_garbage_over_the_wire_gets_quick_answers(serve):
    port = serve(auth_app()).port
    started = time.monotonic()
    for path, value, status in [("/reports", b"Digest " + b"," * 10240, 400),
                                ("/reports", b'Digest username="bob', 400),
                                ("/admin/", b"Basic " + b"," * 10240, 400),
                                ("/admin/", b"Token xyz", 401), ("/admin/", b"", 401)]:
        raw = exchange(port, b"GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
                       % (path.encode(), value))
        assert responses(raw)[0][0] == status, (path, value[:20])
    assert time.monotonic() - started < 2.0


# ===========================================================================
# Tools: static files
# ===========================================================================



def _png(width, height, rgb):
    """A solid-colour PNG, built with zlib (no imaging library needed)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _png_pixels(data):
    """(width, height, set of (r, g, b)) of an 8-bit RGB/RGBA PNG, unfiltered in pure Python."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, prev, colours = zlib.decompress(idat), width * bpp, bytearray(width * bpp), set()
    for y in range(height):
        kind, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a, b = row[i - bpp] if i >= bpp else 0, prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                row[i] = (row[i] + a) & 255
            elif kind == 2:
                row[i] = (row[i] + b) & 255
            elif kind == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        colours.update(tuple(row[x:x + 3]) for x in range(0, stride, bpp))
        prev = row
    return width, height, colours


@pytest.fixture
def site(tmp_path):
    """A static directory, its sibling 'static-secret', a file outside and symlinks."""
    root = tmp_path / "static"
    (root / "css").mkdir(parents=True)
    (root / "js").mkdir()
    (root / "img").mkdir()
    (root / "empty").mkdir()
    (root / "index.html").write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" href="css/site.css?v=1">'
        '<script src="js/app.js" defer></script></head>'
        '<body><img src="img/dot.png" width="40" height="40"><div id="box"></div></body></html>')
    (root / "css" / "site.css").write_text(
        "html, body { background: #1e90ff; margin: 0; }\n#box { width: 200px; height: 100px; }\n")
    (root / "js" / "app.js").write_text('document.getElementById("box").style.background = "#ff8c00";\n')
    (root / "img" / "dot.png").write_bytes(_png(4, 4, (0, 200, 0)))
    (root / "noext").write_text("<script>alert(1)</script>")
    (root / "data.zzqq").write_bytes(bytes(range(256)) * 4)
    (root / "héllo wörld.txt").write_text("unicode name")
    (tmp_path / "static-secret").mkdir()
    (tmp_path / "static-secret" / "secret.txt").write_text("TOP-SECRET")
    (tmp_path / "outside.txt").write_text("TOP-SECRET outside")
    os.symlink(str(tmp_path / "outside.txt"), str(root / "link_out.txt"))
    os.symlink("css/site.css", str(root / "link_in.css"))
    return tmp_path


def static_app(site, **options):
    class Root:
        static = minipub.StaticDir(str(site / "static"), **options)
        follow = minipub.StaticDir(str(site / "static"), follow_symlinks=True)
        noindex = minipub.StaticDir(str(site / "static"), index=None)

        @minipub.expose
        def download(self):
            return minipub.serve_file(str(site / "static" / "héllo wörld.txt"), disposition="attachment")
    return minipub.Application(Root())


def get(port, path, method="GET", headers=()):
    """One request on a fresh connection: (status, headers, body)."""
    head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n" % (method, path, port)
    head += "".join("%s: %s\r\n" % h for h in headers)
    raw = exchange(port, head.encode("latin-1") + b"\r\n")
    if method == "HEAD":
        head, _, rest = raw.partition(b"\r\n\r\n")
        return responses(head + b"\r\n\r\n")[0][:2] + (rest,)  # whatever follows the head
    return responses(raw)[0]


def test_static_types_nosniff_and_validators(serve, site):
    port = serve(static_app(site)).port
    expected = {"/static/index.html": "text/html; charset=utf-8",
                "/static/css/site.css": "text/css; charset=utf-8",
                "/static/js/app.js": "text/javascript; charset=utf-8",
                "/static/img/dot.png": "image/png",
                "/static/noext": "application/octet-stream",
                "/static/data.zzqq": "application/octet-stream",
                "/static/h%C3%A9llo%20w%C3%B6rld.txt": "text/plain; charset=utf-8"}
    for path, ctype in expected.items():
        status, headers, body = get(port, path)
        assert (status, headers["content-type"]) == (200, ctype), path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["accept-ranges"] == "bytes" and headers["cache-control"] == "no-cache"
        assert int(headers["content-length"]) == len(body) > 0
        assert headers["etag"].startswith('"') and headers["last-modified"].endswith(" GMT")
    status, headers, body = get(port, "/static/")
    assert status == 200 and body.startswith(b"<!DOCTYPE html>")
    status, headers, _ = get(port, "/static/css")
    assert status == 301 and headers["location"] == "http://127.0.0.1:%d/static/css/" % port
    assert get(port, "/static/css/")[0] == 404  # no index.html there, and no listing
    assert get(port, "/noindex/")[0] == 404
    assert get(port, "/static/missing.css")[0] == 404
    status, headers, _ = get(port, "/static/index.html", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = get(port, "/download")
    assert headers["content-disposition"] == (
        "attachment; filename=\"h_llo w_rld.txt\"; filename*=UTF-8''h%C3%A9llo%20w%C3%B6rld.txt")
    assert body == b"unicode name"


def test_static_conditional_requests(serve, site):
    port = serve(static_app(site)).port
    status, headers, body = get(port, "/static/css/site.css")
    etag, modified = headers["etag"], headers["last-modified"]
    cases = [
        ([("If-None-Match", etag)], 304), ([("If-None-Match", 'W/' + etag)], 304),
        ([("If-None-Match", '"other", ' + etag)], 304), ([("If-None-Match", '"other"')], 200),
        ([("If-Modified-Since", modified)], 304),
        ([("If-Modified-Since", "Thu, 01 Jan 1998 00:00:00 GMT")], 200),
        ([("If-Modified-Since", "not a date")], 200),
        ([("If-None-Match", '"other"'), ("If-Modified-Since", modified)], 200),  # INM wins
        ([("If-Match", etag)], 200), ([("If-Match", "*")], 200),
        ([("If-Match", '"other"')], 412), ([("If-Match", "W/" + etag)], 412),  # strong comparison
        ([("If-Unmodified-Since", "Thu, 01 Jan 1998 00:00:00 GMT")], 412),
        ([("If-Unmodified-Since", modified)], 200),
    ]
    for headers_sent, want in cases:
        status, headers, body = get(port, "/static/css/site.css", headers=headers_sent)
        assert status == want, headers_sent
        if want == 304:
            assert body == b"" and headers["etag"] == etag
            assert headers["content-length"] == str(os.path.getsize(site / "static/css/site.css"))


def test_static_ranges_and_head(serve, site, monkeypatch):
    server = serve(static_app(site))
    calls = []
    real_sendfile = minipub._Conn.sendfile

    def spy(conn, file, offset, count):
        calls.append((offset, count))
        return real_sendfile(conn, file, offset, count)
    monkeypatch.setattr(minipub._Conn, "sendfile", spy)
    port, data = server.port, (site / "static/data.zzqq").read_bytes()
    status, headers, body = get(port, "/static/data.zzqq", headers=[("Range", "bytes=10-19")])
    assert (status, body, headers["content-range"]) == (206, data[10:20], "bytes 10-19/1024")
    assert calls == [(10, 10)]  # zero-copy with the right offset and length
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=1000-")])[2] == data[1000:]
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=-24")])[2] == data[-24:]
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=1020-5000")])[2] == data[1020:]
    for bad in ("bytes=1024-", "bytes=2000-3000", "bytes=-0", "bytes=5-2"):
        status, headers, _ = get(port, "/static/data.zzqq", headers=[("Range", bad)])
        assert (status, headers["content-range"]) == (416, "bytes */1024"), bad
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=x-y"):
        status, _, body = get(port, "/static/data.zzqq", headers=[("Range", ignored)])
        assert (status, body) == (200, data), ignored
    etag = get(port, "/static/data.zzqq")[1]["etag"]
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=0-0"), ("If-Range", etag)])[0] == 206
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=0-0"), ("If-Range", '"old"')])[0] == 200
    status, headers, body = get(port, "/static/data.zzqq", "HEAD")
    assert (status, headers["content-length"], body) == (200, "1024", b"")
    assert headers["content-type"] == "application/octet-stream"
    with urllib.request.urlopen("http://127.0.0.1:%d/static/data.zzqq" % port, timeout=5) as resp:
        assert resp.read() == data
    assert calls[-1] == (0, 1024)


def test_static_range_over_tls_uses_the_fallback_loop(serve, site, tmp_path):
    import ssl
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1"], capture_output=True, timeout=60, check=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    (site / "static" / "big.bin").write_bytes(os.urandom(600000))
    data = (site / "static" / "big.bin").read_bytes()
    server = minipub.Server(static_app(site), "127.0.0.1", 0, ssl_context=context).start()
    try:
        url = "https://127.0.0.1:%d/static/big.bin" % server.port
        assert curl_body("-k", "-r", "300000-599998", url) == data[300000:599999]
        assert curl_body("-k", url) == data
    finally:
        server.stop(10)


@pytest.mark.parametrize("pause", [False, True], ids=["fast", "pausing"])
def test_static_20mb_over_https_arrives_byte_exact(serve, site, tls, pause):
    """The TLS file loop used sendall() on a non-blocking socket: a full buffer ended the download."""
    data = os.urandom(20000000)
    (site / "static" / "big.bin").write_bytes(data)
    server = serve(static_app(site), **_tls_options(tls))
    with _connect(server.port, tls) as sock:
        sock.sendall(b"GET /static/big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if pause:
            threading.Event().wait(0.5)  # the client reads nothing for a while: the server's sends block
        raw, closed = recv_until_close(sock, timeout=30)
    head, _, body = raw.partition(b"\r\n\r\n")
    size, same = len(body), hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert closed and b"Content-Length: 20000000\r\n" in head and (size, same) == (20000000, True)


TRAVERSALS = [
    "/static/../static-secret/secret.txt",
    "/static/..%2fstatic-secret/secret.txt",
    "/static/..%2Fstatic-secret%2Fsecret.txt",
    "/static/%2e%2e/static-secret/secret.txt",
    "/static/%2e%2e%2fstatic-secret%2fsecret.txt",
    "/static/.%2e/outside.txt",
    "/static/%252e%252e%252fstatic-secret%252fsecret.txt",
    "/static/..%252fstatic-secret/secret.txt",
    "/static/..%5cstatic-secret%5csecret.txt",
    "/static/..\\static-secret\\secret.txt",
    "/static/secret.txt%00.css",
    "/static/index.html%00",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/C:%5cWindows%5cwin.ini",
    "/static/C:/Windows/win.ini",
    "/static/./../outside.txt",
    "/static/css/../../outside.txt",
    "/static/link_out.txt",
    "/static/..",
    "/static/%2e%2e",
]


def test_static_traversal_vectors_are_refused(serve, site):
    port = serve(static_app(site)).port
    for target in TRAVERSALS + ["http://127.0.0.1:%d/static/..%%2fstatic-secret/secret.txt" % port]:
        status, headers, body = get(port, target)
        assert status in (403, 404), target
        assert b"SECRET" not in body and headers["x-content-type-options"] == "nosniff"
    assert get(port, "/static/css/site.css")[0] == 200  # the same server still serves


def test_static_symlink_policy(serve, site):
    port = serve(static_app(site)).port
    assert get(port, "/static/link_out.txt")[0] == 403
    status, _, body = get(port, "/static/link_in.css")
    assert status == 200 and body.startswith(b"html, body")  # a link inside the directory is fine
    status, _, body = get(port, "/follow/link_out.txt")
    assert (status, body) == (200, b"TOP-SECRET outside")
    assert get(port, "/follow/../outside.txt")[0] == 403  # following links never allows '..'


def test_static_page_in_headless_chromium(serve, site, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    app, seen = static_app(site), []

    def counting(environ, start_response):
        def start(status, headers, exc_info=None):
            seen.append((environ["PATH_INFO"], status[:3]))
            return start_response(status, headers, exc_info)
        return app(environ, start)
    port = serve(counting).port
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--user-data-dir=%s" % (tmp_path / "profile"), "--screenshot=%s" % shot,
           "--window-size=320,240", "http://127.0.0.1:%d/static/" % port]
    subprocess.run(cmd, capture_output=True, timeout=90)
    statuses = dict(seen)
    for path in ("/static/", "/static/css/site.css", "/static/js/app.js", "/static/img/dot.png"):
        assert statuses.get(path) == "200", (path, seen)
    width, height, colours = _png_pixels(shot.read_bytes())
    assert (width, height) == (320, 240)
    assert {(30, 144, 255), (255, 140, 0), (0, 200, 0)} <= colours  # CSS, JS and image all applied


# ===========================================================================
# Tools: uploads
# ===========================================================================

def upload_app(tmp_path, config=None):
    """/up echoes what arrived (sha256 per file); /keep saves each Part under tmp_path/saved."""
    seen = []

    def describe(value):
        if isinstance(value, list):
            return [describe(v) for v in value]
        if not isinstance(value, minipub.Part):
            return value
        seen.append(value)
        return {"filename": value.filename, "safe": value.safe_filename, "type": value.content_type,
                "size": value.size, "sha256": hashlib.sha256(value.file.read()).hexdigest(),
                "on_disk": not isinstance(value.file, io.BytesIO)}

    class Root:
        @minipub.expose
        def up(self, **params):
            return {name: describe(value) for name, value in params.items()}

        @minipub.expose
        def keep(self, **params):
            out = {}
            for name, part in params.items():
                target = str(tmp_path / "saved" / part.safe_filename)
                temp = part._temp
                part.save(target)
                out[name] = [temp, os.stat(target).st_ino]
            return out

        @minipub.expose
        def put(self):
            digest, size = hashlib.sha256(), 0
            while True:
                block = minipub.request.body.read(65536)
                if not block:
                    return {"size": size, "sha256": digest.hexdigest()}
                digest.update(block)
                size += len(block)
    app = minipub.Application(Root(), config)
    app.seen = seen
    return app


@pytest.fixture
def tmpdir_uploads(tmp_path, monkeypatch):
    """Temporary files of uploads go to a directory of their own, checked empty afterwards."""
    import tempfile
    spool = tmp_path / "spool"
    spool.mkdir()
    (tmp_path / "saved").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    return spool


def curl_body(*args, timeout=60):
    if not HAS_CURL:
        pytest.skip("curl not installed")
    out = subprocess.run(["curl", "-sS", "--max-time", "50", *args], capture_output=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_upload_curl_files_and_fields(serve, tmp_path, tmpdir_uploads):
    app = upload_app(tmp_path, {"request.upload_spool_size": 64 * 1024})
    port = serve(app).port
    big, small = os.urandom(3 * 1024 * 1024 + 17), b"\r\n--not-a-boundary\r\n" * 100
    (tmp_path / "big.bin").write_bytes(big)
    (tmp_path / "small.txt").write_bytes(small)
    (tmp_path / "empty").write_bytes(b"")
    body = curl_body("-F", "title=Été", "-F", "tag=a", "-F", "tag=b",
                "-F", "big=@%s" % (tmp_path / "big.bin"),
                "-F", "small=@%s;type=text/plain;filename=résumé ü.txt" % (tmp_path / "small.txt"),
                "-F", "empty=@%s" % (tmp_path / "empty"),
                "http://127.0.0.1:%d/up" % port)
    got = json.loads(body)
    assert got["title"] == "Été" and got["tag"] == ["a", "b"]
    assert got["big"] == {"filename": "big.bin", "safe": "big.bin", "type": "application/octet-stream",
                          "size": len(big), "sha256": _sha(big), "on_disk": True}
    assert got["small"] == {"filename": "résumé ü.txt", "safe": "résumé ü.txt", "type": "text/plain",
                            "size": len(small), "sha256": _sha(small), "on_disk": False}
    assert got["empty"]["size"] == 0 and got["empty"]["sha256"] == _sha(b"")
    assert got["empty"]["on_disk"] is False
    assert all(part.file.closed for part in app.seen) and os.listdir(tmpdir_uploads) == []


def test_upload_curl_chunked_and_put_stream(serve, tmp_path, tmpdir_uploads):
    port = serve(upload_app(tmp_path, {"request.upload_spool_size": 1024})).port
    data = os.urandom(2 * 1024 * 1024)
    (tmp_path / "data.bin").write_bytes(data)
    got = json.loads(curl_body("-H", "Transfer-Encoding: chunked", "-F", "f=@%s" % (tmp_path / "data.bin"),
                          "-F", "n=1", "http://127.0.0.1:%d/up" % port))
    assert (got["f"]["size"], got["f"]["sha256"], got["n"]) == (len(data), _sha(data), "1")
    got = json.loads(curl_body("-T", str(tmp_path / "data.bin"), "http://127.0.0.1:%d/put" % port))
    assert got == {"size": len(data), "sha256": _sha(data)}
    assert os.listdir(tmpdir_uploads) == []


def test_upload_save_renames_and_temp_files_go(serve, tmp_path, tmpdir_uploads):
    port = serve(upload_app(tmp_path, {"request.upload_spool_size": 1024})).port
    data = os.urandom(100000)
    (tmp_path / "x.bin").write_bytes(data)
    got = json.loads(curl_body("-F", "a=@%s;filename=../../evil/x.bin" % (tmp_path / "x.bin"),
                          "-F", "b=@%s;filename=small.txt" % (tmp_path / "small.txt")
                          if (tmp_path / "small.txt").write_bytes(b"tiny") else "",
                          "http://127.0.0.1:%d/keep" % port))
    temp, inode = got["a"]
    assert os.path.dirname(temp) == str(tmpdir_uploads)
    assert (tmp_path / "saved" / "x.bin").read_bytes() == data  # safe_filename dropped ../../evil/
    assert inode == os.stat(tmp_path / "saved" / "x.bin").st_ino  # renamed, not copied
    assert got["b"][0] is None and (tmp_path / "saved" / "small.txt").read_bytes() == b"tiny"
    assert os.listdir(tmpdir_uploads) == []


def test_upload_in_a_spooled_body_is_a_window_on_it_saved_as_a_copy(serve, tmp_path, tmpdir_uploads):
    # A body over server.body_buffer_size is spooled by the poll role: its parts are read from the
    # spool (written once), small ones copied into memory; save() copies, byte-exact.
    port = serve(upload_app(tmp_path, {"request.upload_spool_size": 1024})).port
    data, tiny = os.urandom(2 * 1024 * 1024 + 5), b"\r\n--x\r\n" * 10
    (tmp_path / "x.bin").write_bytes(data)
    (tmp_path / "t.txt").write_bytes(tiny)
    got = json.loads(curl_body("-F", "a=@%s" % (tmp_path / "x.bin"), "-F", "b=@%s" % (tmp_path / "t.txt"),
                               "http://127.0.0.1:%d/keep" % port))
    assert (tmp_path / "saved" / "x.bin").read_bytes() == data and got["a"][0] is None
    assert (tmp_path / "saved" / "t.txt").read_bytes() == tiny
    assert os.listdir(tmpdir_uploads) == []
    spool = tmp_path / "spool.bin"
    spool.write_bytes(b"head" + data + b"tail")
    with open(spool, "r+b") as body:
        part = minipub.Part("f", "x", "application/octet-stream", spool_size=10)
        part._window(body, 4, len(data))
        assert part.file.read(3) == data[:3] and part.file.tell() == 3
        assert part.file.seek(-2, 2) == len(data) - 2 and part.file.read() == data[-2:]
        part.file.seek(0)
        assert b"".join(iter(lambda: part.file.read(65536), b"")) == data
        part.close()
        assert not body.closed  # the window never closes the spooled body


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_part_save_creates_files_as_open_would(tmp_path, tmpdir_uploads, umask):
    parts = {}
    for name, size in (("spooled", 5000), ("memory", 10)):  # a rename and a copy
        parts[name] = minipub.Part("f", "x", "text/plain", spool_size=1000)
        parts[name]._write(b"d" * size)
    assert parts["spooled"]._temp and not parts["memory"]._temp
    (tmp_path / "old").write_bytes(b"old")
    os.chmod(tmp_path / "old", 0o600)
    old_umask = os.umask(umask)
    try:
        for name, part in parts.items():
            part.save(str(tmp_path / name))
            assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name
        parts["memory"].save(str(tmp_path / "old"))  # an existing file keeps its mode, as with open()
    finally:
        os.umask(old_umask)
    assert os.stat(tmp_path / "old").st_mode & 0o777 == 0o600 and (tmp_path / "old").read_bytes() == b"d" * 10
    assert (tmp_path / "spooled").read_bytes() == b"d" * 5000
    for part in parts.values():
        part.close()
    assert os.listdir(tmpdir_uploads) == []


def test_part_safe_filename():
    cases = {"../../etc/passwd": "passwd", "C:\\Users\\me\\cv.pdf": "cv.pdf", "..": "", "a/": "",
             "ok name.txt": "ok name.txt", "C:evil.txt": "C_evil.txt", "nul\x00x.txt": "nul_x.txt",
             "sub\\..": ""}
    for sent, safe in cases.items():
        assert minipub.Part("f", sent, "text/plain", 10).safe_filename == safe, sent


def _multipart(*parts, boundary="XyZ"):
    body = b"".join(b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode(), head, data) for head, data in parts)
    return body + b"--%s--\r\n" % boundary.encode()


def test_parse_multipart_edge_cases(tmp_path):
    app = upload_app(tmp_path)
    ctype = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    tricky = b"\r\n--XyY--XyZ\n--XyZ\r--Xy" * 30000 + b"\r\n--X"  # near-boundaries across every block edge
    body = (b"preamble to ignore\r\n" + _multipart(
        (b'Content-Disposition: form-data; name="f"; filename="a \\"q\\".bin"', tricky),
        (b"Content-Disposition: form-data; name=\"g\"; filename=\"x\"; filename*=UTF-8''%E2%82%AC.txt\r\n"
         b"Content-Type: image/png", b"png"),
        (b'content-disposition: form-data; name="v"', b"")) + b"epilogue")
    status, _, out = call_app(app, "POST", "/up", body=body, headers=ctype)
    got = json.loads(out)
    assert status == 200 and got["v"] == ""
    assert (got["f"]["filename"], got["f"]["sha256"]) == ('a "q".bin', _sha(tricky))
    assert (got["g"]["filename"], got["g"]["type"]) == ("€.txt", "image/png")
    quoted = {"Content-Type": 'multipart/form-data; boundary="a b"'}
    padded = b'--a b  \r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--a b--'
    assert json.loads(call_app(app, "POST", "/up", body=padded, headers=quoted)[2]) == {"x": "1"}
    bad = [(ctype, b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nunterminated"),
           (ctype, _multipart((b"Content-Disposition: form-data", b"no name"))),
           (ctype, _multipart((b"Content-Disposition: attachment; name=\"x\"", b""))),
           (ctype, _multipart((b'Content-Disposition: form-data; name="x"', b"\xff\xfe"))),
           (ctype, b"--XyZ junk\r\n"),
           ({"Content-Type": "multipart/form-data"}, b""),
           ({"Content-Type": "multipart/form-data; boundary=" + "x" * 71}, b"")]
    for headers, body in bad:
        assert call_app(app, "POST", "/up", body=body, headers=headers)[0] == 400, body[:60]


def test_parse_multipart_any_block_size(tmp_path, monkeypatch):
    """Whatever the contents and wherever the block edges fall, every byte comes back."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    app = upload_app(tmp_path, {"request.upload_spool_size": 16})
    content = st.binary(max_size=80).map(lambda b: b.replace(b"b", b"\r\n--").replace(b"c", b"\r"))

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(block=st.integers(1, 40), files=st.lists(content, min_size=1, max_size=4))
    def check(block, files):
        hypothesis.assume(not any(b"\r\n--XyZ" in f + b"\r\n" for f in files))
        monkeypatch.setattr(minipub, "_BLOCK", block)
        body = _multipart(*[(b'Content-Disposition: form-data; name="f%d"; filename="x"' % i, f)
                            for i, f in enumerate(files)])
        status, _, out = call_app(app, "POST", "/up", body=body,
                                  headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        got = json.loads(out)
        assert status == 200 and [got["f%d" % i]["sha256"] for i in range(len(files))] == [
            _sha(f) for f in files]
    check()


def test_upload_limits_413(serve, tmp_path, tmpdir_uploads):
    config = {"request.max_form_parts": 3, "request.max_form_field_size": 1000}
    port = serve(upload_app(tmp_path, config), max_request_body_size=200000).port
    url = "http://127.0.0.1:%d/up" % port
    (tmp_path / "big.bin").write_bytes(os.urandom(300000))

    def status(*args):
        return int(curl_body("-o", "/dev/null", "-w", "%{http_code}", *args, url))
    assert status("-F", "f=@%s" % (tmp_path / "big.bin")) == 413  # Content-Length over the limit
    assert status("-H", "Transfer-Encoding: chunked", "-F", "f=@%s" % (tmp_path / "big.bin")) == 413
    assert status("-F", "a=1", "-F", "b=2", "-F", "c=3", "-F", "d=4") == 413
    assert status("-F", "a=1", "-F", "b=2", "-F", "c=3") == 200
    assert status("-F", "a=" + "x" * 1001) == 413
    assert status("-F", "a=" + "x" * 600, "-F", "b=" + "x" * 600) == 413  # fields count together
    assert status("--data-urlencode", "a=" + "x" * 1000) == 413  # a whole urlencoded body
    assert status("-d", "a=1&b=2&c=3&d=4") == 413
    assert status("-d", "a=1&b=2") == 200
    assert os.listdir(tmpdir_uploads) == []


def test_upload_disconnect_frees_the_spooled_body_at_once(serve, tmp_path, tmpdir_uploads, caplog):
    """An upload over body_buffer_size is spooled by the poll role; the client goes: its buffer and
    temporary file are freed at once, and the application never saw it."""
    server = serve(upload_app(tmp_path, {"request.upload_spool_size": 1024}), thread_pool=1,
                   body_buffer_size=64 * 1024)
    head = (b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            b"Content-Length: 50000000\r\n\r\n"
            b'--B\r\nContent-Disposition: form-data; name="f"; filename="f.bin"\r\n\r\n')
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + b"x" * 500000)
        poll = server._poll
        assert wait_until(lambda: any(c.body.size >= 500000 for c in list(poll.timers["body"])), 10)
        body = next(iter(poll.timers["body"])).body
        assert body.file is not None and body.parts is None  # on disk beyond body_buffer_size
    assert wait_until(lambda: body.file.closed and not server._conns, 2)
    assert os.listdir(tmpdir_uploads) == []
    assert curl_body("http://127.0.0.1:%d/up" % server.port) == b"{}"  # one worker, and it is free
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a gone client is no handler bug


def test_bodies_in_memory_are_bounded_for_all_connections_together(serve):
    # server.max_body_memory: past it a body goes to a temporary file, whatever its size, and
    # what a body held is given back when it is done with (served, or its client gone).
    def echo(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%s %s" % (type(environ["wsgi.input"]).__name__.encode(), environ["wsgi.input"].read())]
    server = serve(echo, max_body_memory=4000)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as held:
        held.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 3000)
        assert wait_until(lambda: server._body_memory == 3000, 5)  # in memory, waiting for the rest
        for size in (100, 2000):  # 3000 + 2000 is over: that one goes to a file
            answer = exchange(server.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                              b"Connection: close\r\n\r\n%s" % (size, b"b" * size))
            assert answer.endswith((b"BytesIO " if size == 100 else b"BufferedRandom ") + b"b" * size)
        assert server._body_memory == 3000
    assert wait_until(lambda: server._body_memory == 0, 5)  # the client went: its part is given back


def test_upload_into_a_full_directory_is_507_and_leaves_nothing(serve, tmp_path, monkeypatch, minipub_logs):
    import tempfile
    full = tmp_path / "full"
    full.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)],
                             capture_output=True, timeout=20)
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here: %s" % mounted.stderr.decode().strip())
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(full))
        port = serve(upload_app(tmp_path, {"request.upload_spool_size": 64 * 1024})).port
        fds = _fd_count()
        body = (b"--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"big.bin\"\r\n\r\n"
                + os.urandom(1024 * 1024) + b"\r\n--B--\r\n")
        raw = exchange(port, b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert raw.startswith(b"HTTP/1.1 507 Insufficient Storage\r\n")
        assert os.listdir(str(full)) == [] and wait_until(lambda: _fd_count() <= fds)
        errors = [r.getMessage() for r in minipub_logs if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and str(full) in errors[0] and "No space left" in errors[0], errors
        assert not [r for r in minipub_logs if r.exc_info]
    finally:
        subprocess.run(["umount", str(full)], capture_output=True, timeout=20)


# ===========================================================================
# Test client
# ===========================================================================

class ClientRoot:
    @minipub.expose
    def index(self, **params):
        req = minipub.request
        return {"method": req.method, "params": {k: v if isinstance(v, (str, list)) else repr(v)
                                                 for k, v in params.items()},
                "cookies": req.cookies, "agent": req.headers.get("User-Agent"), "path": req.path}

    @minipub.expose
    def echo(self):
        minipub.response.headers["X-Seen-Type"] = minipub.request.headers.get("Content-Type", "")
        return minipub.request.body.read(1 << 20)

    @minipub.expose
    def login(self, user="bob"):
        minipub.response.set_cookie("sid", user)
        raise minipub.HTTPRedirect("/?after=login")

    @minipub.expose
    def logout(self):
        minipub.response.delete_cookie("sid")
        return "bye"

    @minipub.expose
    def loop(self):
        raise minipub.HTTPRedirect("/loop", 307)

    @minipub.expose
    def away(self):
        raise minipub.HTTPRedirect("http://example.org/", 302)

    @minipub.expose
    def upload(self, note, **files):
        return {"note": note, **{name: [p.filename, p.content_type, p.file.read().decode()]
                                 for name, p in files.items()}}

    @minipub.expose
    class Item:
        def GET(self):
            return "got"

        def PUT(self):
            return "put " + minipub.request.body.read(100).decode()

        def PATCH(self):
            return "patched"

        def DELETE(self):
            minipub.response.status = 202
            return "deleted"

        def OPTIONS(self):
            minipub.response.headers["Allow"] = "GET, PUT, PATCH, DELETE, OPTIONS"
            return ""
    item = Item()


def test_client_every_method_params_json_form_and_headers():
    client = minipub.TestClient(ClientRoot())
    got = client.get("/?a=1", params={"b": ["2", "3"], "c": "é"}, headers={"User-Agent": "pytest"})
    assert (got.status, got.reason, got.headers["CONTENT-TYPE"]) == (200, "OK", "application/json")
    assert got.json() == {"method": "GET", "params": {"a": "1", "b": ["2", "3"], "c": "é"}, "cookies": {},
                          "agent": "pytest", "path": "/"}
    assert client.post("/", data={"x": ["1", "2"], "y": "z"}).json()["params"] == {"x": ["1", "2"], "y": "z"}
    got = client.post("/echo", json={"k": [1, "ü"]})
    assert (got.json(), got.headers["x-seen-type"]) == ({"k": [1, "ü"]}, "application/json")
    got = client.request("POST", "/echo", data="ü", headers=[("Content-Type", "text/plain; charset=utf-8")])
    assert (got.body, got.headers["X-Seen-Type"]) == ("ü".encode(), "text/plain; charset=utf-8")
    assert [(r.status, r.text) for r in (client.get("/item"), client.put("/item", data=b"it"),
                                          client.patch("/item"), client.delete("/item"))] == [
        (200, "got"), (200, "put it"), (200, "patched"), (202, "deleted")]
    got = client.options("/item")
    assert (got.status, got.headers["allow"]) == (200, "GET, PUT, PATCH, DELETE, OPTIONS")
    got = client.head("/item")
    assert (got.status, got.body) == (200, b"")
    assert client.get("/missing").status == 404 and "Not Found" in client.get("/missing").text
    assert client.post("/item").headers["Allow"].startswith("GET, HEAD")  # 405 with Allow


def test_client_cookie_jar_and_redirects():
    client = minipub.TestClient(ClientRoot())
    got = client.post("/login", data={"user": "ann"})
    assert (got.status, got.headers["Location"], client.cookies) == (303, "http://localhost/?after=login",
                                                                      {"sid": "ann"})
    got = client.post("/login", data={"user": "joe"}, follow_redirects=True)  # a 303 is followed with GET
    assert (got.status, got.url) == (200, "/?after=login")
    assert got.json()["method"] == "GET" and got.json()["cookies"] == {"sid": "joe"}
    assert [f for f in got.fields if f[0] == "Set-Cookie"] == []
    assert client.get("/logout").text == "bye" and client.cookies == {}  # Max-Age=0 deletes
    with pytest.raises(RuntimeError, match="more than 10 redirects"):
        client.get("/loop", follow_redirects=True)
    assert client.get("/away", follow_redirects=True).status == 302  # another host: not ours to call
    following = minipub.TestClient(ClientRoot(), follow_redirects=True)
    assert following.get("/login").url == "/?after=login" and following.get("/").json()["cookies"] == {"sid": "bob"}

    def expiring(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Set-Cookie", "a=1; Path=/"),
                                  ("Set-Cookie", "b=2; Expires=Thu, 01 Jan 1970 00:00:00 GMT"),
                                  ("Set-Cookie", "c=3; Expires=Fri, 01 Jan 2100 00:00:00 GMT")])
        return [environ.get("HTTP_COOKIE", "").encode()]
    wsgi = minipub.TestClient(expiring)
    wsgi.cookies.update(b="old")
    assert wsgi.get("/").text == "b=old" and wsgi.cookies == {"a": "1", "c": "3"}
    assert wsgi.get("/", headers={"Cookie": "z=9"}).text == "z=9; a=1; c=3"


def test_client_multipart_file_upload(tmp_path):
    (tmp_path / "report.csv").write_bytes(b"a,b\n1,2\n")
    client = minipub.TestClient(ClientRoot())
    with open(tmp_path / "report.csv", "rb") as report:
        got = client.post("/upload", data={"note": "Été"}, files={
            "a": ('sp ace "q".txt', "text ü", "text/plain; charset=utf-8"), "b": report, "c": b"\r\n--raw\r\n"})
    assert got.status == 200, got.text
    assert got.json() == {"note": "Été", "a": ['sp ace "q".txt', "text/plain; charset=utf-8", "text ü"],
                          "b": ["report.csv", "application/octet-stream", "a,b\n1,2\n"],
                          "c": ["c", "application/octet-stream", "\r\n--raw\r\n"]}


def test_client_wraps_roots_passes_config_and_validates_wsgi():
    class Broken:
        @minipub.expose
        def index(self):
            raise ValueError("boom")
    def echo(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["wsgi.input"].read(10)]
    assert minipub.TestClient(echo).post("/", data=b"you").body == b"you"  # a WSGI callable is used as it is
    assert minipub.TestClient(ClientRoot).get("/").status == 200  # a root class is instantiated
    assert "ValueError: boom" not in minipub.TestClient(Broken()).get("/").text
    shown = minipub.TestClient(Broken(), {"request.show_tracebacks": True}).get("/")
    assert shown.status == 500 and "ValueError: boom" in shown.text
    app = minipub.Application(ClientRoot())
    assert minipub.TestClient(app).app is app

    def not_wsgi(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return ["text, not bytes"]
    with pytest.raises(AssertionError):  # wsgiref.validate is on the way
        minipub.TestClient(not_wsgi).get("/")
    assert minipub.TestClient.__test__ is False  # `from minipub import TestClient` adds no pytest class


# ===========================================================================
# Tools: sessions
# ===========================================================================

class SessionRoot:
    _cp_config = {"tools.sessions.on": True}

    @minipub.expose
    def index(self):  # tut07_sessions: a hit counter
        count = minipub.session.get("count", 0) + 1
        minipub.session["count"] = count
        return str(count)

    @minipub.expose
    def peek(self):
        return {"id": minipub.session.id, "original": minipub.session.originalid,
                "data": dict(minipub.session.items())}

    @minipub.expose
    def login(self, user="bob"):
        minipub.session.regenerate()
        minipub.session["user"] = user
        raise minipub.HTTPRedirect("/peek")

    @minipub.expose
    def logout(self):
        minipub.session.delete()
        return "bye"

    @minipub.expose
    def missing(self):
        minipub.session["seen"] = True
        raise minipub.NotFound()

    @minipub.expose
    def untouched(self):
        return "hello"

    @minipub.expose
    def bad(self, kind="set"):
        minipub.session["x"] = {1, 2} if kind == "set" else "x" * 5000
        return "stored"


STORE_KINDS = ("memory", "file", "sqlite", "cookie")


def session_config(kind, tmp_path, **more):
    conf = {"tools.sessions.storage_type": kind}
    if kind == "file":
        conf["tools.sessions.storage_path"] = str(tmp_path / "sessions")
    elif kind == "sqlite":
        conf["tools.sessions.storage_path"] = str(tmp_path / "sessions.db")
    elif kind == "cookie":
        conf["tools.sessions.secret"] = ["new secret", "old secret"]
    conf.update(("tools.sessions." + k, v) for k, v in more.items())
    return {"/": conf}


class Browser:
    """A cookie jar over call_app: keeps what Set-Cookie says, as a browser would."""

    def __init__(self, app):
        self.app, self.jar, self.set_cookie = app, {}, None

    def get(self, path, method="GET", body=b"", headers=None):
        headers = dict(headers or {})
        if self.jar:
            headers["Cookie"] = "; ".join("%s=%s" % kv for kv in self.jar.items())
        status, fields, data = call_app(self.app, method, path, body=body, headers=headers)
        self.set_cookie = fields.get("set-cookie")
        if self.set_cookie:
            pair, _, attrs = self.set_cookie.partition(";")
            name, _, value = pair.partition("=")
            if "Max-Age=0" in attrs:
                self.jar.pop(name, None)
            else:
                self.jar[name] = value
        return status, data.decode()


def _peek(browser):
    status, body = browser.get("/peek")
    assert status == 200, body
    return json.loads(body)


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_session_round_trip_expiry_regenerate_delete(kind, tmp_path):
    clock = FakeClock()
    app = minipub.Application(SessionRoot(), session_config(kind, tmp_path, timeout=10, clock=clock))
    b = Browser(app)
    assert b.get("/untouched") == (200, "hello") and b.set_cookie is None  # unused: nothing stored, no cookie
    assert [b.get("/")[1] for _ in range(3)] == ["1", "2", "3"]
    first = _peek(b)
    assert first["data"] == {"count": 3} and first["id"] == first["original"]
    assert "Max-Age=600" in b.set_cookie
    assert b.get("/login?user=ann")[0] == 303  # saved on the redirect, under a fresh id
    after = _peek(b)
    assert after["data"] == {"count": 3, "user": "ann"} and after["id"] != first["id"]
    if kind != "cookie":  # the old id is gone from the store: replaying it gets an empty session
        assert minipub._store_for(None, kind, app.sections["/"].get("tools.sessions.storage_path"),
                                  ("new secret", "old secret")).load(first["id"]) is None
    clock.now += 9 * 60
    assert b.get("/")[1] == "4"  # each save moves the expiry on: 10 minutes from the last use
    clock.now += 10 * 60 + 1
    assert b.get("/")[1] == "1"  # expired: a new session
    assert b.get("/logout") == (200, "bye") and "Max-Age=0" in b.set_cookie
    assert b.jar == {} and b.get("/")[1] == "1"


def test_session_cookie_store_refuses_tampered_expired_and_unknown_secrets(tmp_path):
    clock = FakeClock()
    app = minipub.Application(SessionRoot(), session_config("cookie", tmp_path, timeout=1, clock=clock))
    b = Browser(app)
    b.get("/")
    b.get("/")
    good = b.jar["session_id"]
    payload, _, mac = good.rpartition(".")
    assert base64.urlsafe_b64decode(payload + "==")  # readable by the client: say so in the README
    forged = base64.urlsafe_b64encode(base64.urlsafe_b64decode(payload + "==").replace(
        b'"count":2', b'"count":9')).rstrip(b"=").decode()
    for cookie in (forged + "." + mac, good[:-2] + "xx", "garbage", good + "\u00e9"):
        b.jar["session_id"] = cookie
        assert b.get("/")[1] == "1", cookie  # refused: a fresh session
    old = minipub.CookieStore(secret=["old secret"]).save("x" * 43, {"count": 5}, clock.now + 60)
    b.jar["session_id"] = old
    assert b.get("/")[1] == "6"  # signed with a secret still listed: accepted, re-signed with the first
    assert minipub.CookieStore(secret=["new secret"]).load(b.jar["session_id"])[1] == {"count": 6}
    b.jar["session_id"] = minipub.CookieStore(secret=["retired"]).save("x" * 43, {"count": 5}, clock.now + 60)
    assert b.get("/")[1] == "1"
    b.jar["session_id"] = old
    clock.now += 61
    assert b.get("/")[1] == "1"  # expiry is signed inside: an old cookie replayed later is refused
    with pytest.raises(minipub.ConfigError, match="secret"):
        minipub.CookieStore()


@pytest.mark.parametrize("kind, kind_of_bad, error", [("file", "set", TypeError), ("sqlite", "set", TypeError),
                                                      ("cookie", "set", TypeError), ("cookie", "big", ValueError)])
def test_session_values_json_cannot_hold_fail_at_save(kind, kind_of_bad, error, tmp_path, caplog):
    app = minipub.Application(SessionRoot(), session_config(kind, tmp_path))
    b = Browser(app)
    assert b.get("/")[1] == "1"
    status, _ = b.get("/bad?kind=" + kind_of_bad)
    assert status == 500
    assert any(r.exc_info and r.exc_info[0] is error for r in caplog.records), caplog.text
    assert b.get("/")[1] == "2"  # the failed save left the session as it was, and unlocked


def test_session_404_keeps_the_cookie_and_fixation_is_refused(tmp_path):
    app = minipub.Application(SessionRoot(), session_config("file", tmp_path))
    b = Browser(app)
    assert b.get("/missing")[0] == 404 and "session_id=" in b.set_cookie
    assert _peek(b)["data"] == {"seen": True}
    planted = "A" * 43  # well formed, but the store never issued it
    b.jar["session_id"] = planted
    b.get("/")
    assert b.jar["session_id"] != planted and _peek(b)["original"] == b.jar["session_id"]
    assert not (tmp_path / "sessions" / ("session-" + planted)).exists()


def test_session_planted_pickle_in_the_store_is_not_executed(tmp_path, caplog):
    import pickle
    app = minipub.Application(SessionRoot(), session_config("file", tmp_path))
    b = Browser(app)
    b.get("/")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    sid = "B" * 43
    (tmp_path / "sessions" / ("session-" + sid)).write_bytes(pickle.dumps(Exploit()))
    b.jar["session_id"] = sid
    assert b.get("/")[1] == "1"
    assert not marker.exists() and b.jar["session_id"] != sid
    assert "unreadable session record" in caplog.text and sid not in caplog.text  # ids are never logged


class _LockedCounter:
    _cp_config = {"tools.sessions.on": True}

    @minipub.expose
    def index(self):
        if minipub.session.locking == "explicit":
            minipub.session.acquire_lock()
        count = minipub.session.get("count", 0)
        threading.Event().wait(0.002)  # widens the read-modify-write window; not a wait for readiness
        minipub.session["count"] = count + 1
        return str(count + 1)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("locking", ["implicit", "early", "explicit"])
def test_session_concurrent_updates_are_never_lost(serve, tmp_path, kind, locking):
    app = minipub.Application(_LockedCounter(), session_config(kind, tmp_path, locking=locking))
    port = serve(app).port
    with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5) as first:
        cookie = first.headers["Set-Cookie"].split(";")[0]
    errors = []

    def hammer():
        try:
            for _ in range(8):
                req = urllib.request.Request("http://127.0.0.1:%d/" % port, headers={"Cookie": cookie})
                urllib.request.urlopen(req, timeout=10).read()
        except OSError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    req = urllib.request.Request("http://127.0.0.1:%d/" % port, headers={"Cookie": cookie})
    assert urllib.request.urlopen(req, timeout=5).read() == b"50"  # 1 + 6 * 8 + this one


def test_session_lock_released_when_the_handler_raises_or_the_client_goes(serve):
    store = minipub.MemoryStore()

    class Root:
        _cp_config = {"tools.sessions.on": True, "tools.sessions.storage_class": store}

        @minipub.expose
        def index(self, fail=""):
            minipub.session["n"] = minipub.session.get("n", 0) + 1  # locked from here (implicit)
            if fail:
                raise RuntimeError("boom")
            return str(minipub.session["n"])

        @minipub.expose
        def upload(self):
            minipub.session["n"] = 0
            return minipub.request.body.read()
    app = minipub.Application(Root())
    b = Browser(app)
    b.get("/")
    assert b.get("/?fail=1")[0] == 500
    assert store.held == {}  # checked first: a lock left held would make the next request wait for ever
    assert b.get("/") == (200, "2")  # the crashed request saved nothing
    server = serve(app, body_buffer_size=1000)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nCookie: session_id=%s\r\nContent-Length: 100000\r\n"
                     b"\r\npartial" % b.jar["session_id"].encode())
        assert wait_until(lambda: server._poll.timers["body"], 5)  # the poll role reads the body (issue 11)
    assert wait_until(lambda: not server._conns, 5)  # the client went: the handler never ran, no lock taken
    assert not store.held and b.get("/") == (200, "3")


def test_session_cookie_attributes_http_https_and_trusted_proxy(serve, tls):
    app = minipub.Application(SessionRoot(), {"server.trusted_proxies": ["127.0.0.1"]})
    server = serve(app)
    plain = responses(exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))[0][1]
    assert re.fullmatch(r"session_id=[A-Za-z0-9_-]{43}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax",
                        plain["set-cookie"])
    proxied = responses(exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: https\r\n"
                                 b"Connection: close\r\n\r\n"))[0][1]
    assert proxied["set-cookie"].endswith("; Max-Age=3600; Secure; HttpOnly; SameSite=Lax")
    secure = serve(app, **_tls_options(tls))
    out = _curl("-si", "--cacert", tls["ca"], "https://localhost:%d/" % secure.port)
    assert re.search(rb"(?i)set-cookie: session_id=[\w-]{43}; Path=/; Max-Age=3600; Secure; HttpOnly; "
                     rb"SameSite=Lax\r\n", out.stdout), out.stdout
    custom = minipub.Application(SessionRoot(), {"/": {
        "tools.sessions.name": "sid", "tools.sessions.path": "/app", "tools.sessions.domain": "example.test",
        "tools.sessions.persistent": False, "tools.sessions.samesite": "Strict", "tools.sessions.secure": True}})
    fields = call_app(custom, "GET", "/")[1]
    assert re.fullmatch(r"sid=[\w-]{43}; Path=/app; Domain=example.test; Secure; HttpOnly; SameSite=Strict",
                        fields["set-cookie"])
    with pytest.raises(minipub.ConfigError, match="no argument 'tiemout'"):
        minipub.Application(SessionRoot(), {"/": {"tools.sessions.tiemout": 5}})


def test_session_file_and_sqlite_read_by_another_process(tmp_path):
    for kind in ("file", "sqlite"):
        conf = session_config(kind, tmp_path)
        b = Browser(minipub.Application(SessionRoot(), conf))
        b.get("/")
        b.get("/")
        code = ("import sys, json, minipub; store = minipub.%s(sys.argv[1]); print(json.dumps(store.load(sys.argv[2])))"
                % {"file": "FileStore", "sqlite": "SqliteStore"}[kind])
        out = subprocess.run([sys.executable, "-c", code, conf["/"]["tools.sessions.storage_path"],
                              b.jar["session_id"]], capture_output=True, text=True, timeout=20,
                             env=dict(os.environ, PYTHONPATH=HERE))
        sid, data, expires = json.loads(out.stdout)
        assert (sid, data) == (b.jar["session_id"], {"count": 2}) and expires > time.time(), out.stderr


_SESSION_RELOAD_APP = '''import os, minipub
class Root:
    _cp_config = {"tools.sessions.on": True, "tools.sessions.storage_type": "sqlite",
                  "tools.sessions.storage_path": "sessions.db"}
    @minipub.expose
    def index(self):
        minipub.session["n"] = minipub.session.get("n", 0) + 1
        return "%s %d" % (GENERATION, minipub.session["n"])
GENERATION = "GENERATION_NAME"
if __name__ == "__main__":
    minipub.quickstart(Root(), config={"engine.autoreload.on": True, "engine.autoreload.frequency": 0.1,
                                       "server.socket_port": int(os.environ["PORT"])})
'''


def test_session_survives_a_reloader_generation(tmp_path, reloading):
    _write_app(tmp_path / "app.py", text=_SESSION_RELOAD_APP.replace("GENERATION_NAME", "one"))
    proc, port, log = reloading([sys.executable, "app.py"])
    wait_for_port(port, proc, timeout=20)
    url = "http://127.0.0.1:%d/" % port
    with urllib.request.urlopen(url, timeout=5) as first:
        cookie = first.headers["Set-Cookie"].split(";")[0]
        assert first.read() == b"one 1"
    get = urllib.request.Request(url, headers={"Cookie": cookie})
    assert urllib.request.urlopen(get, timeout=5).read() == b"one 2"
    _write_app(tmp_path / "app.py", text=_SESSION_RELOAD_APP.replace("GENERATION_NAME", "two"))
    _wait_for(port, lambda status, body: body.startswith("two"))  # a new child process
    assert urllib.request.urlopen(get, timeout=5).read() == b"two 3"  # the new process knows it


def test_session_cleanup_runs_only_while_sessions_exist(tmp_path):
    clock = FakeClock()
    store = minipub.MemoryStore()
    app = minipub.Application(SessionRoot(), {"/": {"tools.sessions.storage_class": store,
                                                    "tools.sessions.clock": clock, "tools.sessions.timeout": 1,
                                                    "tools.sessions.clean_freq": 0.001}})
    for _ in range(20):
        call_app(app, "GET", "/untouched")
    assert store.timer is None  # requests that never use the session arm nothing
    b = Browser(app)
    b.get("/")
    assert store.timer is not None and len(store.sessions) == 1
    assert wait_until(lambda: store.timer is not None and store.timer.is_alive(), 5)  # re-armed: a session lives
    clock.now += 61
    assert wait_until(lambda: store.timer is None and not store.sessions, 5)  # expired, swept, and no more wake-ups
    for _ in range(5):
        call_app(app, "GET", "/untouched")
    assert store.timer is None


# -- CSRF ----------------------------------------------------------------------

class CsrfRoot:
    _cp_config = {"tools.sessions.on": True, "tools.csrf.on": True}

    def __init__(self):
        self.theme = "light"

    @minipub.expose
    def form(self):
        return '<form method="post" action="/settings"><input name="csrf_token" value="%s">' % minipub.csrf_token()

    @minipub.expose
    def settings(self, theme=None):
        if minipub.request.method == "POST":
            self.theme = theme
        return "theme " + self.theme


def _csrf_case(headers=None, body="theme=dark", with_cookie=True, token=None, app=None, **environ):
    app = app or minipub.Application(CsrfRoot())
    b = Browser(app)
    b.get("/form")
    sent = re.search(r'value="([\w-]+)"', b.get("/form")[1]).group(1)
    if not with_cookie:
        b.jar.clear()
    fields = dict(FORM, **(headers or {}))
    body = body + ("&csrf_token=" + (sent if token == "good" else token) if token else "")
    status, fields, data = call_app(app, "POST", "/settings", body=body.encode(),
                                    headers=dict(fields, **({"Cookie": "session_id=" + b.jar["session_id"]}
                                                            if b.jar else {})), environ=environ or None)
    return status, data.decode(), sent


@pytest.mark.parametrize("headers, token, status", [
    ({}, None, 403),
    ({"Sec-Fetch-Site": "same-origin"}, None, 200),
    ({"Sec-Fetch-Site": "none"}, None, 200),
    ({"Sec-Fetch-Site": "same-site", "Origin": "http://other.127.0.0.1.nip.io"}, None, 403),
    ({"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}, None, 403),
    ({"Origin": "http://127.0.0.1"}, None, 200),  # setup_testing_defaults: Host 127.0.0.1, port 80
    ({"Origin": "http://127.0.0.1:8080"}, None, 403),
    ({"Origin": "null"}, None, 403),
    ({"Sec-Fetch-Site": "cross-site"}, "good", 200),
    ({"Sec-Fetch-Site": "cross-site"}, "forged", 403),
])
def test_csrf_accepted_and_refused(headers, token, status):
    got, body, _ = _csrf_case(headers, token=token)
    assert got == status, body
    assert ("theme dark" in body) if status == 200 else ("Cross-site request refused" in body)


def test_csrf_header_token_proxy_origin_and_cookieless_clients():
    status, body, _ = _csrf_case({"Sec-Fetch-Site": "cross-site"}, token=None)
    assert status == 403
    app = minipub.Application(CsrfRoot())
    b = Browser(app)
    token = re.search(r'value="([\w-]+)"', b.get("/form")[1]).group(1)
    assert b.get("/settings", "POST", b"theme=dark", dict(FORM, **{"X-CSRF-Token": token})) == (200, "theme dark")
    assert b.get("/settings", "POST", b"theme=dim", dict(FORM, **{"X-CSRF-Token": token[:-1]}))[0] == 403
    assert _csrf_case(with_cookie=False)[0] == 200  # an API client without cookies is not a CSRF victim
    strict = minipub.Application(CsrfRoot(), {"/": {"tools.csrf.cookieless": True}})
    assert _csrf_case(with_cookie=False, app=strict)[0] == 403
    proxied = minipub.Application(CsrfRoot(), {"server.trusted_proxies": ["127.0.0.1"]})
    assert _csrf_case({"Origin": "https://public.example", "X-Forwarded-Proto": "https",
                       "X-Forwarded-Host": "public.example"}, app=proxied, REMOTE_ADDR="127.0.0.1")[0] == 200
    assert _csrf_case({"Origin": "https://public.example"}, app=proxied, REMOTE_ADDR="127.0.0.1")[0] == 403


def test_csrf_cross_site_form_post_in_headless_chromium(serve, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    seen = []

    class Attacker:
        @minipub.expose
        def index(self, target):
            return ('<form method="post" action="%s/settings"><input name="theme" value="evil"></form>'
                    '<script>document.forms[0].submit()</script>' % target)

    class Victim(CsrfRoot):
        @minipub.expose
        def start(self, then):  # the user is logged in, then visits the attacker's page
            minipub.session["user"] = "ann"
            raise minipub.HTTPRedirect(then)

        @minipub.expose
        def own(self):  # the site's own form, posted by the browser: same origin
            return ('<form method="post" action="/settings"><input name="theme" value="dark"></form>'
                    '<script>document.forms[0].submit()</script>')

    root = Victim()
    victim_app = minipub.Application(root)

    def recording(environ, start_response):
        def start(status, headers, exc_info=None):
            seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], status[:3],
                         environ.get("HTTP_SEC_FETCH_SITE"), environ.get("HTTP_ORIGIN"), "HTTP_COOKIE" in environ))
            return start_response(status, headers, exc_info)
        return victim_app(environ, start)
    victim = serve(recording).port
    attacker = serve(minipub.Application(Attacker())).port
    base = "http://127.0.0.1:%d" % victim

    def visit(url, profile):
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--user-data-dir=%s" % (tmp_path / profile), "--dump-dom", url]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return wait_until(lambda: any(s[:2] == ("POST", "/settings") for s in seen), 60)
        finally:
            proc.kill()
            proc.wait(10)
    then = "http://127.0.0.1:%d/?%s" % (attacker, urlencode({"target": base}))
    assert visit(base + "/start?" + urlencode({"then": then}), "p1"), seen
    post = [s for s in seen if s[0] == "POST"][0]
    assert post[2:] == ("403", "same-site", "http://127.0.0.1:%d" % attacker, True), seen  # cookie sent, refused
    assert root.theme == "light"
    seen.clear()
    assert visit(base + "/start?" + urlencode({"then": "/own"}), "p2"), seen
    post = [s for s in seen if s[0] == "POST"][0]
    assert post[2:4] == ("200", "same-origin") and root.theme == "dark"


# -- CherryPy's session programs, unchanged but for the import -----------------

def test_session_cherrypy_tutorials_5_to_9(tmp_path):
    cherrypy = minipub
    import random
    import string

    class StringGeneratorWebService:
        exposed = True

        @cherrypy.tools.accept(media="text/plain")
        def GET(self):
            return cherrypy.session["mystring"]

        def POST(self, length=8):
            some_string = "".join(random.sample(string.hexdigits, int(length)))
            cherrypy.session["mystring"] = some_string
            return some_string

        def PUT(self, another_string):
            cherrypy.session["mystring"] = another_string

        def DELETE(self):
            cherrypy.session.pop("mystring", None)

    class StringGenerator:
        @cherrypy.expose
        def generate(self, length=8):
            some_string = "".join(random.sample(string.hexdigits, int(length)))
            cherrypy.session["mystring"] = some_string
            return some_string

        @cherrypy.expose
        def display(self):
            return cherrypy.session["mystring"]

        @cherrypy.expose
        def whoami(self):
            return cherrypy.session.id  # tutorial 9 keys its sqlite rows on it

    class HitCounter:  # tut07_sessions
        _cp_config = {"tools.sessions.on": True}

        @cherrypy.expose
        def index(self):
            count = cherrypy.session.get("count", 0) + 1
            cherrypy.session["count"] = count
            return "You have viewed this page %s times in this session." % count

        @cherrypy.tools.sessions(timeout=5)  # the decorator form, with an argument
        @cherrypy.expose
        def short(self):
            cherrypy.session["count"] = 0
            return "reset"
    counter = Browser(cherrypy.Application(HitCounter()))
    assert [counter.get("/")[1].split()[5] for _ in range(3)] == ["1", "2", "3"]
    assert counter.get("/short") == (200, "reset") and "Max-Age=300" in counter.set_cookie
    site = StringGenerator()
    site.generator = StringGeneratorWebService()
    conf = {"/": {"tools.sessions.on": True},
            "/generator": {"request.dispatch": cherrypy.MethodDispatcher(),
                           "tools.response_headers.on": True,
                           "tools.response_headers.headers": [("Content-Type", "text/plain")]}}
    b = Browser(cherrypy.Application(site, conf))
    status, made = b.get("/generate?length=12")
    assert status == 200 and len(made) == 12 and b.get("/display") == (200, made)
    assert b.get("/whoami") == (200, b.jar["session_id"])
    status, posted = b.get("/generator", "POST", b"length=6", FORM)
    assert b.get("/generator", headers={"Accept": "text/plain"}) == (200, posted)
    b.get("/generator", "PUT", b"another_string=hello", FORM)
    assert b.get("/generator", headers={"Accept": "text/plain"}) == (200, "hello")
    b.get("/generator", "DELETE")
    assert b.get("/generator", headers={"Accept": "text/plain"})[0] == 500  # KeyError, as on CherryPy
    assert b.get("/generate") and b.get("/display")[0] == 200


def test_session_gunicorn_four_workers_keep_a_login_with_sqlite(tmp_path):
    pytest.importorskip("gunicorn")
    (tmp_path / "gapp.py").write_text(
        "import minipub, os\n"
        "class Root:\n"
        "    _cp_config = {'tools.sessions.on': True, 'tools.sessions.storage_type': 'sqlite',\n"
        "                  'tools.sessions.storage_path': %r}\n"
        "    @minipub.expose\n"
        "    def login(self):\n"
        "        minipub.session.regenerate()\n"
        "        minipub.session['user'] = 'ann'\n"
        "        raise minipub.HTTPRedirect('/status')\n"
        "    @minipub.expose\n"
        "    def status(self):\n"
        "        if 'user' not in minipub.session:\n"
        "            raise minipub.HTTPRedirect('/login', 303)\n"
        "        return '%%s %%d' %% (minipub.session['user'], os.getpid())\n"
        "application = minipub.Application(Root())\n" % str(tmp_path / "sessions.db"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "4", "-b", "127.0.0.1:%d" % port,
                             "--chdir", str(tmp_path), "gapp:application"], env=dict(os.environ, PYTHONPATH=HERE),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout=20)
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/login")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 303
        cookie = resp.getheader("Set-Cookie").split(";")[0]
        answers, pids = [], set()

        def status():  # a new connection each; four clients at once, so every worker takes some
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/status", headers={"Cookie": cookie})
                resp = conn.getresponse()
                body = resp.read().decode()
                answers.append(resp.status)
                pids.add(body.split()[-1])
            except OSError as exc:
                answers.append(repr(exc))
            conn.close()
        def client():  # at least 50 requests, and on until two workers answered (bounded)
            while (len(answers) < 50 or len(pids) < 2) and len(answers) < 1000:
                status()
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
        assert len(answers) >= 50 and set(answers) == {200}, [a for a in answers if a != 200]
        assert len(pids) >= 2  # several workers answered, all knew the login
    finally:
        proc.terminate()
        proc.wait(15)


# -- examples/admin.py: login, settings behind CSRF, logout --------------------

@pytest.fixture
def admin(monkeypatch, tmp_path):
    import importlib
    monkeypatch.setenv("ADMIN_SESSION_DB", str(tmp_path / "admin.db"))
    monkeypatch.setenv("ADMIN_PASSWORD", "s3cret")
    from examples import admin as module
    module = importlib.reload(module)  # reads the environment again
    return module


def test_admin_example_login_settings_logout(admin):
    b = Browser(minipub.Application(admin.Root()))
    assert b.get("/")[0] == 303  # not logged in
    token = re.search(r'name="csrf_token" value="([\w-]+)"', b.get("/login")[1]).group(1)
    before = b.jar["session_id"]
    assert b.get("/login", "POST", urlencode({"user": "admin", "password": "nope", "csrf_token": token}).encode(),
                 FORM)[0] == 403
    assert b.get("/login", "POST", urlencode({"user": "admin", "password": "s3cret", "csrf_token": token}).encode(),
                 FORM)[0] == 303
    assert b.jar["session_id"] != before  # regenerated on login
    status, body = b.get("/settings")
    assert status == 200 and "Logged in" not in body
    token = re.search(r'name="csrf_token" value="([\w-]+)"', body).group(1)
    change = {"hostname": "box1", "ntp_server": "ntp.example"}
    assert b.get("/settings", "POST", urlencode(change).encode(), dict(FORM, Origin="http://evil.example"))[0] == 403
    assert admin.SETTINGS["hostname"] == "appliance"
    assert b.get("/settings", "POST", urlencode(dict(change, csrf_token=token)).encode(),
                 dict(FORM, Origin="http://evil.example"))[0] == 303
    assert admin.SETTINGS["hostname"] == "box1" and "box1" in b.get("/")[1]
    assert b.get("/logout", "POST", ("csrf_token=" + token).encode(), FORM)[0] == 303
    assert b.get("/")[0] == 303


def test_admin_example_from_the_command_line(tmp_path):
    import http.cookiejar
    port = free_port()
    env = dict(os.environ, ADMIN_SESSION_DB=str(tmp_path / "admin.db"), ADMIN_PASSWORD="pw")
    proc = subprocess.Popen([sys.executable, "minipub.py", "examples.admin:Root", "--port", str(port),
                             "--log.screen", "false"], cwd=HERE, env=env)
    try:
        wait_for_port(port, proc)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        base = "http://127.0.0.1:%d" % port
        token = re.search(rb'value="([\w-]+)"', opener.open(base + "/login", timeout=5).read()).group(1).decode()
        form = urlencode({"user": "admin", "password": "pw", "csrf_token": token}).encode()
        assert b"Logged in as admin" in opener.open(base + "/login", form, timeout=5).read()
    finally:
        proc.terminate()
        proc.wait(15)


# ===========================================================================
# Reloader
# ===========================================================================

def test_reloader_poller_step_reports_changed_and_deleted_files(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 1\n")
    poller = minipub.Poller([str(a), str(b)])
    assert poller.step() == []
    mtime = os.stat(a).st_mtime_ns
    os.utime(a, ns=(mtime + 10 ** 9, mtime + 10 ** 9))
    assert poller.step() == [str(a)]
    assert poller.step() == []  # reported once
    b.unlink()
    assert poller.step() == [str(b)]
    b.write_text("y = 2\n")
    assert poller.step() == [str(b)]  # it came back
    c = tmp_path / "c.py"
    c.write_text("z = 1\n")
    seen_by_child = list(minipub._mtime(str(c)))  # as JSON brings it
    c.write_text("z = 22\n")  # edited before the parent heard of the file
    poller.watch({str(c): seen_by_child})
    assert poller.step() == [str(c)]


def test_reloader_watches_app_files_but_not_stdlib_or_site_packages(tmp_path):
    import json as stdlib_module
    app = type(sys)("app")
    app.__file__ = str(tmp_path / "app.py")
    installed = type(sys)("installed")
    installed.__file__ = os.path.join(str(tmp_path), "lib", "site-packages", "pkg", "__init__.py")
    builtin = type(sys)("builtin")  # no __file__
    files = minipub._module_files([stdlib_module, app, installed, builtin, minipub])
    assert files == [str(tmp_path / "app.py"), os.path.abspath(minipub.__file__)]


def test_reloader_error_files_name_the_file_with_the_syntax_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(SyntaxError) as info:
        compile(broken.read_text(), str(broken), "exec")
    assert str(broken) in minipub._error_files(info.value)


def test_reloader_failure_names_the_apps_line_not_the_librarys(tmp_path):
    app = tmp_path / "app.py"
    app.write_text("import json\n\nCONFIG = json.loads('{not json')\n")
    with pytest.raises(ValueError) as info:
        exec(compile(app.read_text(), str(app), "exec"), {})
    text = minipub._where(info.value)
    assert text.startswith("JSONDecodeError: ") and text.endswith("(%s, line 3)" % app)


def test_reloader_interpreter_flags_are_passed_on(tmp_path):
    script = tmp_path / "flags.py"
    script.write_text("import sys; sys.path.insert(0, %r)\nimport minipub\n"
                      "print(minipub._interpreter_args())\n" % HERE)
    out = subprocess.run([sys.executable, "-O", "-X", "dev", str(script), "arg"],
                         capture_output=True, text=True, timeout=30)
    import ast
    args = ast.literal_eval(out.stdout)
    assert "-O" in args and "dev" in args and str(script) not in args and "arg" not in args


_RELOAD_APP = '''import os, sys
sys.path.insert(0, {here!r})
import minipub

class Root:
    @minipub.expose
    def index(self):
        return {body!r} + " optimize=%d" % sys.flags.optimize

if __name__ == "__main__":
    minipub.quickstart(Root(), config={{"engine.autoreload.on": True, "log.screen": True,
                                       "server.socket_port": int(os.environ["PORT"])}})
'''


def _write_app(path, body=None, text=None):
    """Write app.py and move its mtime on by a second, so the edit is seen however fast."""
    old = os.stat(path).st_mtime_ns if os.path.exists(path) else time.time_ns()
    with open(path, "w") as f:
        f.write(text if text is not None else _RELOAD_APP.format(here=HERE, body=body))
    os.utime(path, ns=(old + 10 ** 9, old + 10 ** 9))


def _get(port, timeout=5.0):
    """(status, body) of GET /, or (None, error) if the connection failed."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    except OSError as exc:
        return None, repr(exc)
    finally:
        conn.close()


def _wait_for(port, predicate, timeout=20.0):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = _get(port, timeout=2.0)
        if last[0] is not None and predicate(*last):
            return last
        time.sleep(0.05)
    raise AssertionError("not served within %ss; last answer %r" % (timeout, last))


@pytest.fixture
def reloading(tmp_path):
    """reloading(argv) -> (process, port, log path), run in tmp_path in its own process group."""
    started = []

    def start(argv):
        port = free_port()
        log = tmp_path / "server.log"
        env = dict(os.environ, PORT=str(port), PYTHONPATH=HERE)
        argv = [a.format(port=port) for a in argv]
        proc = subprocess.Popen(argv, cwd=str(tmp_path), env=env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc, port, log
    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _group_gone(pgid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_reloader_cli_edit_syntax_error_fix_then_sigterm(tmp_path, reloading):
    app = tmp_path / "app.py"
    _write_app(app, "one")
    proc, port, log = reloading([sys.executable, os.path.join(HERE, "minipub.py"), "app:Root",
                                 "--reload", "--port", "{port}"])
    _wait_for(port, lambda status, body: body.startswith("one"))
    _write_app(app, "two")
    _wait_for(port, lambda status, body: body.startswith("two"))
    _write_app(app, text="class Root:\n    def index(self:\n")  # a syntax error on line 2
    deadline = time.monotonic() + 20
    while "SyntaxError" not in log.read_text() and time.monotonic() < deadline:
        assert _get(port)[1].startswith("two")  # the old version keeps serving throughout
        time.sleep(0.05)
    text = log.read_text()
    assert "SyntaxError" in text and "app.py, line 2" in text
    assert _get(port) == (200, "two optimize=0")
    _write_app(app, "three")
    _wait_for(port, lambda status, body: body.startswith("three"))
    assert log.read_text().count("SyntaxError") == 1  # logged once, not at every poll
    proc.terminate()
    assert proc.wait(20) == 0
    assert _group_gone(proc.pid), "a child outlived its parent"
    assert _get(port, timeout=1.0)[0] is None  # nobody holds the socket any more


@pytest.mark.parametrize("tracebacks", [False, True])
def test_reloader_first_start_failure_serves_500_until_fixed(tmp_path, reloading, tracebacks):
    app = tmp_path / "app.py"
    _write_app(app, text="import minipub\nclass Root:\n    x = 1 / 0\n")
    proc, port, log = reloading([sys.executable, os.path.join(HERE, "minipub.py"), "app:Root",
                                 "--reload", "--port", "{port}",
                                 "--request.show_tracebacks", str(tracebacks)])
    status, body = _wait_for(port, lambda status, body: True)
    assert status == 500
    assert "ZeroDivisionError" in body and "app.py, line 3" in body
    assert ("Traceback" in body) == tracebacks
    _write_app(app, text="import minipub\nclass Root:\n    def index(self:\n")
    status, body = _wait_for(port, lambda status, body: "SyntaxError" in body)
    assert status == 500 and "app.py, line 3" in body  # the page shows the latest error
    _write_app(app, "fixed")
    _wait_for(port, lambda status, body: status == 200 and body.startswith("fixed"))
    proc.terminate()
    assert proc.wait(20) == 0 and _group_gone(proc.pid)


@pytest.mark.parametrize("how", ["script", "module"])
def test_reloader_quickstart_keeps_flags_and_stops_on_ctrl_c(tmp_path, reloading, how):
    app = tmp_path / "app.py"
    _write_app(app, "first")
    argv = [sys.executable, "-O"] + (["app.py"] if how == "script" else ["-m", "app"])
    proc, port, log = reloading(argv)
    assert _wait_for(port, lambda status, body: body.startswith("first"))[1] == "first optimize=1"
    _write_app(app, "second")
    assert _wait_for(port, lambda status, body: body.startswith("second"))[1] == "second optimize=1"
    os.killpg(proc.pid, 2)  # Ctrl-C in a terminal signals the whole foreground group
    proc.wait(20)
    assert _group_gone(proc.pid), "a child outlived Ctrl-C"


def test_reloader_refuses_no_connection_across_reloads(tmp_path, reloading):
    app = tmp_path / "app.py"
    _write_app(app, "gen0")
    proc, port, log = reloading([sys.executable, os.path.join(HERE, "minipub.py"), "app:Root",
                                 "--reload", "--port", "{port}"])
    _wait_for(port, lambda status, body: body.startswith("gen0"))
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            results.append(_get(port))
            time.sleep(0.01)
    thread = threading.Thread(target=client)
    thread.start()
    try:
        for gen in (1, 2):
            _write_app(app, "gen%d" % gen)
            deadline = time.monotonic() + 20
            while not (results and results[-1][1].startswith("gen%d" % gen)):
                assert time.monotonic() < deadline, "generation %d never served" % gen
                time.sleep(0.01)
    finally:
        stop.set()
        thread.join(10)
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    assert len(results) > 20


# -- workers, systemd, Unix sockets, pid file, privileges ----------------------------

_WORKER_APP = '''import os, sys
import minipub

def umask():
    old = os.umask(0)
    os.umask(old)
    return old

class Root:
    @minipub.expose
    def index(self):
        return "%d %d %s %o" % (os.getpid(), os.getuid(), minipub.request.remote_addr or "-", umask())

    @minipub.expose
    @minipub.auth_digest("reports", users={"bob": "pässword"})
    def reports(self):
        return str(os.getpid())
'''


def _children(pid):
    """The pids whose parent is ``pid``, from /proc."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if name.isdigit() and int(fields[1]) == pid:
            found.append(int(name))
    return sorted(found)


def _switches(pid):
    """Voluntary context switches of every thread of ``pid`` so far: each wake-up is one."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return total


def _wake_ups(pids, seconds):
    before = [_switches(pid) for pid in pids]
    threading.Event().wait(seconds)  # measuring idleness: the interval is the point
    return [_switches(pid) - b for pid, b in zip(pids, before)]


def _served_pids(port, want, timeout=20.0):
    """GET / until ``want`` distinct pids answered; the set."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < want:
        assert time.monotonic() < deadline, "only pids %s answered" % seen
        status, body = _get(port)
        if status == 200:
            seen.add(int(body.split()[0]))
    return seen


@pytest.fixture
def workers(tmp_path, reloading):
    """workers(*options) -> (process, port, log): minipub app:Root --workers 2 in tmp_path."""
    (tmp_path / "app.py").write_text(_WORKER_APP)

    def start(*options):
        # -W error: Python 3.12+ would warn here if the parent forked with a thread running.
        proc, port, log = reloading([sys.executable, "-W", "error::DeprecationWarning", os.path.join(
            HERE, "minipub.py"), "app:Root", "--port", "{port}", "--workers", "2"] + list(options))
        _wait_for(port, lambda status, body: status == 200)
        return proc, port, log
    return start


def test_workers_serve_from_two_pids_share_the_digest_secret_and_sleep_when_idle(workers):
    proc, port, log = workers()
    pids = _served_pids(port, 2)
    assert wait_until(lambda: _children(proc.pid) == sorted(pids), 10), (_children(proc.pid), pids)
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/reports")
    challenge = conn.getresponse()
    challenge.read()
    conn.close()
    assert challenge.status == 401
    nonce_from = set()
    for nc in range(1, 200):  # one worker's nonce, accepted by the other too
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        auth = digest(challenge.getheader("WWW-Authenticate"), nc=nc)
        conn.request("GET", "/reports", headers={"Authorization": auth})
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        assert answer.status == 200, body
        nonce_from.add(int(body))
        if nonce_from == pids:
            break
    assert nonce_from == pids
    everyone = [proc.pid] + sorted(pids)
    assert wait_until(lambda: max(_wake_ups(everyone, 0.3)) == 0, 10)  # the children's watchdogs park
    woke = _wake_ups(everyone, 1.5)
    assert max(woke) == 0, "wake-ups in 1.5 s (parent, children): %s" % woke
    proc.terminate()
    assert proc.wait(20) == 0 and _group_gone(proc.pid)
    assert "Traceback" not in log.read_text()


def test_workers_survive_a_killed_child_and_roll_on_sighup_without_losing_a_request(workers):
    import signal
    proc, port, log = workers()
    first = _served_pids(port, 2)
    results, stop, turn = [], threading.Event(), threading.Lock()

    def client():
        while not stop.is_set():
            with turn:  # the test kills a child only between two requests
                results.append(_get(port))
            time.sleep(0.005)
    thread = threading.Thread(target=client)
    thread.start()
    try:
        victim = min(first)
        with turn:
            os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(_children(proc.pid)) == 2 and victim not in _children(proc.pid), 20)
        second = _served_pids(port, 2)
        assert victim not in second and len(second & first) == 1  # the survivor and a new child
        assert "exited with status -9; restarting" in log.read_text()
        before = len(results)
        os.kill(proc.pid, signal.SIGHUP)
        assert wait_until(lambda: not set(_children(proc.pid)) & second and len(_children(proc.pid)) == 2, 30)
        third = _served_pids(port, 2)
        assert not third & second
        assert len(results) > before + 10
    finally:
        stop.set()
        thread.join(10)
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    proc.terminate()  # drains every child
    assert proc.wait(20) == 0 and _group_gone(proc.pid)


def _notifications(name):
    """A datagram socket bound at ``name`` ("@..." abstract): (socket, read(until) -> messages)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:] if name.startswith("@") else name)
    sock.settimeout(20)
    got = []

    def read(until, count=1):
        while got.count(until) < count:
            got.extend(sock.recv(4096).decode().split("\n"))
        return got
    return sock, read


def test_socket_activation_and_sd_notify_ready_reloading_stopping(tmp_path, reloading):
    import signal
    (tmp_path / "app.py").write_text(_WORKER_APP)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    name = "@minipub-test-%d" % os.getpid()
    notify, read = _notifications(name)
    # systemd's part: the socket as fd 3, LISTEN_PID the pid of the process that execs minipub.
    wrapper = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
               "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="http", NOTIFY_SOCKET=name, PYTHONPATH=HERE)
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-c", wrapper, str(listener.fileno()), os.path.join(HERE, "minipub.py"),
                             "app:Root", "--workers", "2", "--port", "1"],  # --port ignored: systemd's socket
                            cwd=str(tmp_path), env=env, pass_fds=(listener.fileno(),), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    listener.close()  # only minipub holds it now
    try:
        assert read("READY=1") == ["READY=1"]  # once both workers serve
        assert len(_served_pids(port, 2)) == 2
        proc.send_signal(signal.SIGHUP)
        got = read("READY=1", 2)  # once every worker has been replaced
        assert got[:2] == ["READY=1", "RELOADING=1"] and got[2].startswith("MONOTONIC_USEC=")
        assert got[3:] == ["READY=1"]
        proc.terminate()
        assert read("STOPPING=1")[-1] == "STOPPING=1"
        assert proc.wait(20) == 0 and _group_gone(proc.pid)
        assert "WATCHDOG=1" not in read("STOPPING=1")  # no WatchdogSec: no watchdog, no wake-ups
    finally:
        notify.close()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def test_sd_notify_path_socket_and_watchdog_in_a_single_process(tmp_path, reloading):
    (tmp_path / "app.py").write_text(_WORKER_APP)
    path = str(tmp_path / "notify")
    notify, read = _notifications(path)
    os.environ.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="100000")
    try:
        proc, port, log = reloading([sys.executable, os.path.join(HERE, "minipub.py"), "app:Root",
                                     "--port", "{port}"])
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    try:
        assert read("READY=1") == ["READY=1"]
        read("WATCHDOG=1")
        started = time.monotonic()
        read("WATCHDOG=1", 4)
        assert time.monotonic() - started >= 0.14  # every 50 ms (half the period), not in a burst
        proc.terminate()
        assert read("STOPPING=1")[-1] == "STOPPING=1" and proc.wait(20) == 0
    finally:
        notify.close()


def _unix_get(path, target="/"):
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(5)
            self.sock.connect(path)
    conn = UnixConnection("localhost", timeout=5)
    try:
        conn.request("GET", target)
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def test_unix_socket_file_mode_cleanup_stale_and_refusals(tmp_path, reloading):
    (tmp_path / "app.py").write_text(_WORKER_APP)
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # what a crashed run leaves: a socket file nobody accepts on
    stale.close()
    argv = [sys.executable, os.path.join(HERE, "minipub.py"), "app:Root", "--server.socket_file", str(path),
            "--server.socket_file_mode", "600"]
    proc, _, log = reloading(argv)
    assert wait_until(lambda: "serving on http://unix:%s:/" % path in log.read_text(), 20), log.read_text()
    status, body = _unix_get(str(path))
    assert status == 200 and body.split()[2] == "-"  # no peer address for a Unix peer
    import stat
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
    taken = run_cli(["app:Root", "--server.socket_file", str(path)], cwd=str(tmp_path))
    assert taken.returncode == 2 and "cannot listen on %s: another process accepts on it" % path in taken.stderr
    proc.terminate()
    assert proc.wait(20) == 0 and not path.exists()  # removed on exit
    path.write_text("precious")
    refused = run_cli(["app:Root", "--server.socket_file", str(path)], cwd=str(tmp_path))
    assert refused.returncode == 2 and "exists and is not a socket: not removing it" in refused.stderr
    assert path.read_text() == "precious"


def test_pidfile_written_refused_while_alive_replaced_when_stale_and_removed(tmp_path, reloading):
    (tmp_path / "app.py").write_text(_WORKER_APP)
    pidfile = tmp_path / "app.pid"
    pidfile.write_text("%d\n" % _dead_pid())  # stale: that process is gone
    proc, port, log = reloading([sys.executable, os.path.join(HERE, "minipub.py"), "app:Root", "--port", "{port}",
                                 "--engine.pidfile", str(pidfile)])
    _wait_for(port, lambda status, body: status == 200)
    assert pidfile.read_text() == "%d\n" % proc.pid
    again = run_cli(["app:Root", "--port", str(free_port()), "--engine.pidfile", str(pidfile)], cwd=str(tmp_path))
    assert again.returncode == 2 and "process %d is running" % proc.pid in again.stderr
    proc.terminate()
    assert proc.wait(20) == 0 and not pidfile.exists()


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait(10)
    return child.pid


def test_daemonize_detaches_with_stdio_on_dev_null(tmp_path):
    (tmp_path / "app.py").write_text(_WORKER_APP)
    pidfile, port = tmp_path / "app.pid", free_port()
    started = run_cli(["app:Root", "--port", str(port), "--engine.daemonize", "true", "--engine.pidfile",
                       str(pidfile), "--log.error_file", str(tmp_path / "error.log")], cwd=str(tmp_path))
    assert started.returncode == 0 and started.stdout == ""
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"), 10)
    pid = int(pidfile.read_text())
    try:
        _wait_for(port, lambda status, body: int(body.split()[0]) == pid)
        assert os.getsid(pid) not in (os.getsid(0), pid)  # a session of its own, and not its leader
        assert {os.readlink("/proc/%d/fd/%d" % (pid, fd)) for fd in (0, 1, 2)} == {os.devnull}
    finally:
        os.kill(pid, 15)
    assert wait_until(lambda: not pidfile.exists(), 20)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="dropping privileges needs root")
def test_drop_privileges_binds_port_81_as_root_then_serves_as_nobody(tmp_path, reloading):
    import pwd
    nobody = pwd.getpwnam("nobody")
    (tmp_path / "app.py").write_text(_WORKER_APP)
    os.chmod(tmp_path, 0o755)
    # After the switch the interpreter still imports (lazily): its library must be readable by nobody,
    # which a pyenv Python under /root is not.
    become = "import os, sys; os.setgid(%d); os.setuid(%d); " % (nobody.pw_gid, nobody.pw_uid)
    python = next((py for py in (sys.executable, "/usr/bin/python3") if os.path.exists(py) and subprocess.run(
        [py, "-c", become + "import json, signal"], capture_output=True, timeout=20).returncode == 0), None)
    if python is None:
        pytest.skip("no Python whose standard library the user nobody can read")
    proc, _, log = reloading([python, os.path.join(HERE, "minipub.py"), "app:Root", "--port", "81",
                              "--engine.user", "nobody", "--engine.umask", "027"])
    try:
        pid, uid, _, umask = _wait_for(81, lambda status, body: status == 200)[1].split()
    finally:
        proc.terminate()
        proc.wait(20)
    assert (int(pid), int(uid), umask) == (proc.pid, nobody.pw_uid, "27")
    # Not root, asked to switch: refused before serving (with workers the parent never imports app.py).
    refused = subprocess.run([python, "-c", become + "os.execv(sys.executable, sys.argv[1:])", python,
                              os.path.join(HERE, "minipub.py"),
                              "app:Root", "--port", str(free_port()), "--engine.user", "root", "--workers", "2"],
                             cwd=str(tmp_path), capture_output=True, text=True, timeout=20)
    assert refused.returncode == 2 and "only root can switch user" in refused.stderr


# ===========================================================================
# Command line and examples
# ===========================================================================

def wait_for_port(port, proc=None, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError("server exited: %r" % (proc.communicate(timeout=5),))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError("port %d never opened" % port)


APP = "import minipub\nclass Root:\n    @minipub.expose\n    def index(self):\n        return 'hi'\n"


def run_cli(args, cwd, timeout=20):
    return subprocess.run([sys.executable, os.path.join(HERE, "minipub.py")] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("source,target,message", [
    (None, "app", "is not MODULE:ATTR"),
    (None, "nosuchmodule:Root", "cannot import nosuchmodule: ModuleNotFoundError"),
    ("class Root:\n    def index(self)\n", "app:Root", "SyntaxError"),
    ("x = 1 / 0\n", "app:Root", "ZeroDivisionError: division by zero (%s, line 1)"),
    ("class Root: pass\n", "app:Nope", "has no attribute 'Nope'"),
])
def test_cli_bad_targets_get_one_line_and_status_2(tmp_path, source, target, message):
    if source is not None:
        (tmp_path / "app.py").write_text(source)
    result = run_cli([target, "--port", "0"], str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    expected = message % (tmp_path / "app.py") if "%s" in message else message
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("files,args,message", [
    ({}, ["app.py:Root"], "target 'app.py:Root' names a file: drop the .py (app:Root)"),
    ({}, ["app.py:Root", "--reload"], "target 'app.py:Root' names a file: drop the .py (app:Root)"),
    ({}, ["app:Root", "--threads", "0"], "'server.thread_pool' must be at least 1, got 0"),
    ({}, ["app:Root", "--port", "99999"], "'server.socket_port' must be 0 to 65535, got 99999"),
    ({}, ["app:Root", "--port", "65536"], "'server.socket_port' must be 0 to 65535, got 65536"),
    ({}, ["app:Root", "--config", "bare.ini"], "bare.ini, line 1: no section header; put the settings under [global]"),
    ({"lazy.py": "class Root:\n    def index(self):\n        return 'no expose'\n"}, ["lazy:Root"],
     "lazy:Root has no exposed handler and is not a WSGI callable(environ, start_response)"),
    ({"lazy.py": "def main():\n    pass\n"}, ["lazy:main"], "lazy:main has no exposed handler"),
    ({"db.py": APP.replace("class Root:", "class Root:\n    def __init__(self, db):\n        pass")}, ["db:Root"],
     "__init__() missing 1 required positional argument: 'db'): serve an instance instead, e.g. root = Root(...)"),
    ({"boom.py": "class Root:\n    def __init__(self):\n        1 / 0\n"}, ["boom:Root"],
     "Root() failed: ZeroDivisionError: division by zero (%(dir)s/boom.py, line 3)"),
    ({"site.py": APP}, ["site:Root"], "'import site' loads %(site)s, not your ./site.py: that module shadows your app"),
    ({"cfg.py": "import minipub\n\nCONFIG = minipub.make_config({'server.socket_prot': 1})\n"}, ["cfg:Root"],
     "cannot import cfg: ConfigError: unknown config key 'server.socket_prot' (%(dir)s/cfg.py, line 3)"),
    ({}, ["nosuchmodule:Root"], "cannot import nosuchmodule: ModuleNotFoundError: No module named 'nosuchmodule'"),
])
def test_cli_startup_mistakes_get_one_line_and_status_2(tmp_path, files, args, message):
    import site
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "bare.ini").write_text("server.socket_port = 1\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = run_cli(args + ["--port", "0"] if "--port" not in args else args, str(tmp_path))
    assert result.returncode == 2, result
    expected = message % {"dir": tmp_path, "site": site.__file__}
    assert result.stderr.startswith("minipub: error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert "minipub.py" not in result.stderr  # never minipub's own line


def _cli_wrapper(tmp_path, how):
    """The command as each way of starting minipub runs it."""
    if how == "script":
        return [sys.executable, os.path.join(HERE, "minipub.py")]
    if how == "module":
        return [sys.executable, "-m", "minipub"]
    wrapper = tmp_path / "minipub"  # what pip's console-script wrapper does
    wrapper.write_text("import sys\nfrom minipub import main\nsys.exit(main())\n")
    return [sys.executable, str(wrapper)]


@pytest.mark.parametrize("how,prog", [("script", "python minipub.py"), ("module", "minipub"), ("command", "minipub")])
def test_cli_names_itself_and_mistyped_options_get_one_line(tmp_path, how, prog):
    env = dict(os.environ, PYTHONPATH=HERE)
    run = [*_cli_wrapper(tmp_path, how)]

    def cli(*args):
        return subprocess.run(run + list(args), cwd=str(tmp_path), env=env, capture_output=True, text=True,
                              timeout=20)
    result = cli("--version")
    assert (result.returncode, result.stdout) == (0, "minipub %s\n" % minipub.__version__)
    assert cli("--help").stdout.startswith("usage: %s [--help] [--version] [options] MODULE:ATTR\n" % prog)
    hint = "run '%s --help' for the options\n" % prog
    result = cli("--prot", "8000", "app:Root")
    assert (result.returncode, result.stderr) == (2, "minipub: error: unknown option --prot; did you mean --port?\n"
                                                  + hint)
    if how != "script":
        return  # the rest is the same whichever way it started
    result = cli("app:Root", "--server.socket_prot=1")
    assert result.stderr == ("minipub: error: unknown option --server.socket_prot; did you mean --server.socket_port?\n"
                             + hint)
    assert cli("app:Root", "--po", "1").stderr.startswith("minipub: error: unknown option --po")  # no abbreviations
    assert cli().stderr == "minipub: error: the following arguments are required: MODULE:ATTR\n" + hint


def test_cli_config_errors(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "bad.ini").write_text("[global]\nserver.socket_prot = 1\n")
    result = run_cli(["app:Root", "--config", "bad.ini"], str(tmp_path))
    assert result.returncode == 2 and "server.socket_prot" in result.stderr
    result = run_cli(["app:Root", "--server.thread_pool", "many"], str(tmp_path))
    assert result.returncode == 2 and "server.thread_pool" in result.stderr


@pytest.mark.parametrize("reload", [False, True])
def test_cli_config_file_path_sections_reach_the_application(tmp_path, reload):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.txt").write_text("static")
    (tmp_path / "site.ini").write_text(
        "[global]\nlog.screen = False\ntools.response_headers.on = True\n"
        "tools.response_headers.headers = [('X-Site', 'global')]\n"
        "[/files]\ntools.staticdir.on = True\ntools.staticdir.dir = %r\n" % str(tmp_path / "files"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "minipub.py"), "app:Root", "--port", str(port),
                             "--config", "site.ini"] + (["--reload"] if reload else []), cwd=str(tmp_path))
    try:
        wait_for_port(port, proc)
        assert wait_until(lambda: _fetch_ok(port, "/files/a.txt"), timeout=15)
        with urllib.request.urlopen("http://127.0.0.1:%d/files/a.txt" % port, timeout=5) as answer:
            assert answer.read() == b"static" and answer.headers["X-Site"] == "global"
    finally:
        proc.terminate()
        proc.wait(15)


def _fetch_ok(port, path):
    try:
        return urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=2).status == 200
    except OSError:
        return False


def test_cli_missing_certificate_is_one_line(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    result = run_cli(["app:Root", "--port", "0", "--certfile", "missing.pem"], str(tmp_path))
    assert result.returncode == 2 and "TLS certificate" in result.stderr and "Traceback" not in result.stderr


def test_cli_port_in_use(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_cli(["app:Root", "--port", str(busy.getsockname()[1])], str(tmp_path))
    assert result.returncode == 2 and "in use" in result.stderr and "Traceback" not in result.stderr


def test_cli_serves_app_that_imports_minipub_and_stops_on_sigterm(tmp_path):
    import signal
    (tmp_path / "app.py").write_text(
        "import minipub\n"
        "class Root:\n"
        "    @minipub.expose\n"
        "    def index(self, who='world'):\n"
        "        return 'Hello, %s from %s' % (who, minipub.request.path)\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "minipub.py"), "app:Root", "--port", str(port)],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        body = urllib.request.urlopen("http://127.0.0.1:%d/?who=you" % port, timeout=5).read()
        assert body == b"Hello, you from /"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "serving on http://127.0.0.1:%d/; Ctrl-C to quit\n" % port in err and '"GET /?who=you HTTP/1.1" 200' in err


def test_cli_script_reruns_itself_from_a_pyc_keeping_pid_argv_and_sigterm(tmp_path):
    """``python minipub.py`` becomes, in the same process, minipub run from a cached .pyc (the
    compiler's garbage is not kept resident); the app sees the script's argv, sys.path and __file__."""
    import signal
    (tmp_path / "app.py").write_text(
        "import json, os, sys, minipub\n"
        "class Root:\n"
        "    @minipub.expose\n"
        "    def index(self):\n"
        "        return json.dumps([os.getpid(), sys.argv, sys.path[:2], minipub.__file__, minipub._how_started(),\n"
        "                           type(minipub.__loader__).__name__, sys.modules['__main__'] is minipub])\n")
    port, script = free_port(), os.path.relpath(os.path.join(HERE, "minipub.py"), str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    argv = [script, "app:Root", "--port", str(port), "--log.screen=false"]
    proc = subprocess.Popen([sys.executable] + argv, cwd=str(tmp_path), env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        answer = json.loads(urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5).read())
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=15)[1]
    mine = os.path.join(str(tmp_path), script)
    assert answer == [proc.pid, argv, [str(tmp_path), os.path.dirname(os.path.realpath(mine))], mine,
                      ["path", os.path.abspath(mine)], "SourcelessFileLoader", True]
    assert proc.returncode == 0 and err == ""
    assert [f for _, _, files in os.walk(str(tmp_path / "cache" / "minipub")) for f in files] == [
        "minipub.%s.pyc" % sys.implementation.cache_tag]


def test_cli_arguments_are_read_by_one_parser():
    def parsed(*argv):
        return {k: v for k, v in minipub._parse_args(list(argv)).items() if v is not None}
    assert parsed("app:Root") == {"target": "app:Root"}
    assert parsed("--port=80", "app:Root", "--reload") == {"target": "app:Root", "port": "80", "reload": True}
    assert parsed("app:Root", "--server.thread_pool", "3", "--log.screen=false", "--host", "::", "--host=") == {
        "target": "app:Root", "server.thread_pool": "3", "log.screen": "false", "host": ""}
    assert parsed("app:Root", "--port", "-1") == {"target": "app:Root", "port": "-1"}  # a value, not an option
    assert parsed("-h") == {"help": True} and parsed("--version") == {"version": True}
    config = minipub._cli_config(minipub._parse_args(["a:b", "--threads", "04", "--server.thread_pool=3"]))
    assert config["server.thread_pool"] == 3  # the key wins over its alias
    for argv, error in ((["a:b", "c"], "unexpected argument 'c'"), (["a:b", "--port"], "option --port wants a value"),
                        (["a:b", "--po", "1"], "unknown option --po; did you mean --port?"),
                        (["a:b", "--reload=1"], "option --reload takes no value"),
                        (["a:b", "--target", "x"], "unknown option --target"), (["-"], "unknown option -"),
                        ([], "the following arguments are required: MODULE:ATTR")):
        with pytest.raises(minipub._UsageError) as info:
            minipub._parse_args(argv)
        assert str(info.value).startswith(error), argv


def test_cli_serves_a_plain_wsgi_callable(tmp_path):
    (tmp_path / "wapp.py").write_text(
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'plain wsgi']\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "minipub.py"), "wapp:application",
                             "--port", str(port), "--log.screen", "false"], cwd=str(tmp_path))
    try:
        wait_for_port(port, proc)
        assert urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5).read() == b"plain wsgi"
    finally:
        proc.terminate()
        proc.wait(15)


def test_runs_under_gunicorn_with_workers(tmp_path):
    pytest.importorskip("gunicorn")
    (tmp_path / "gapp.py").write_text(
        "import minipub, os\n"
        "class Root:\n"
        "    @minipub.expose\n"
        "    def index(self):\n"
        "        return 'pid %d' % os.getpid()\n"
        "application = minipub.Application(Root())\n")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=HERE)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:%d" % port,
                             "--chdir", str(tmp_path), "gapp:application"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout=20)
        bodies = {urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5).read() for _ in range(20)}
        assert all(b.startswith(b"pid ") for b in bodies)
    finally:
        proc.terminate()
        proc.wait(15)


def test_import_is_lazy():
    code = ("import sys; sys.path.insert(0, %r); import minipub; heavy = {'ssl', 'json', 're', 'threading', "
            "'inspect', 'logging', 'email', 'tempfile', 'argparse', 'configparser', 'http', 'urllib.parse', "
            "'hashlib'}; "
            "print(sorted(heavy & set(sys.modules)))" % HERE)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == "[]", out.stderr



# -- the examples (examples/*.py), called as WSGI apps ------------------------

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
HTML = "text/html; charset=utf-8"


example_call = call_app


def post_form(app, path, fields):
    """POST ``fields`` (a dict or list of pairs) form-urlencoded."""
    return example_call(app, "POST", path, body=urlencode(fields).encode(), headers=FORM)


def location_path(headers):
    """The path of a Location header, whether it is absolute or not."""
    return urlsplit(headers["location"]).path


# --------------------------------------------------------------------- hello

@pytest.fixture
def hello_example():
    return minipub.Application(hello.Root())


def test_hello_index(hello_example):
    status, headers, body = example_call(hello_example, "GET", "/")
    assert status == 200
    assert body == b"Hello, world!"
    assert headers["content-type"] == HTML


def test_hello_project(hello_example):
    assert example_call(hello_example, "GET", "/project/42")[::2] == (
        200, b"Details for project 42")


def test_hello_project_ignores_extra_path_and_query(hello_example):
    assert example_call(hello_example, "GET", "/project/42/7", "x=1")[::2] == (
        200, b"Details for project 42")


def test_hello_project_without_id_is_404(hello_example):
    assert example_call(hello_example, "GET", "/project")[0] == 404


def test_hello_unknown_path_is_404(hello_example):
    assert example_call(hello_example, "GET", "/missing")[0] == 404


def test_hello_passes_wsgi_validator():
    app = validator(minipub.Application(hello.Root()))
    status, _, body = example_call(app, "GET", "/")
    assert (status, body) == (200, b"Hello, world!")


# ----------------------------------------------------------------------- faq

@pytest.fixture
def faq_app():
    return minipub.Application(faq.Root())


def example_get(app, path, query=""):
    status, _, body = example_call(app, "GET", path, query)
    return status, body


def test_faq_index_links_to_every_url_it_demonstrates(faq_app):
    client = minipub.TestClient(faq_app, follow_redirects=True)
    page = client.get("/").text
    assert "<h1>minipub FAQ examples</h1>" in page and 'action="items"' in page
    links = [html.unescape(href) for href in re.findall(r'href="([^"]*)"', page)]
    shown = {urlsplit(url).path + ("?" + urlsplit(url).query if urlsplit(url).query else "")
             for url in re.findall(r"http://127\.0\.0\.1:8080(/[^'\s]*)", faq.__doc__)}
    assert shown <= {"/" + link for link in links}  # every URL the docstring shows is linked
    assert client.post("/items", data={"name": "pencil"}).status == 201
    for link in links:
        assert client.get("/" + link).status == 200, link


def test_faq_extra_path_elements_become_positional_args(faq_app):
    assert example_get(faq_app, "/project/123/456/789", "x=blah") == (
        200, b"Project 123; extra path: 456/789; options: x=blah")


def test_faq_project_with_id_only(faq_app):
    assert example_get(faq_app, "/project/123") == (
        200, b"Project 123; extra path: ; options: ")


def test_faq_project_missing_id_is_404(faq_app):
    assert example_get(faq_app, "/project")[0] == 404


def test_faq_dot_in_segment_maps_to_underscore(faq_app):
    status, headers, body = example_call(faq_app, "GET", "/report.xml")
    assert status == 200
    assert body == b"<report><status>ok</status></report>"
    assert headers["content-type"].startswith("application/xml")


def test_faq_extra_positional_arg_is_404(faq_app):
    assert example_get(faq_app, "/report.xml/extra")[0] == 404


def test_faq_default_catches_paths_below_its_node(faq_app):
    assert example_get(faq_app, "/wiki/Some/Page") == (200, b"Wiki page: Some/Page")
    assert example_get(faq_app, "/wiki/Single") == (200, b"Wiki page: Single")


def test_faq_index_beats_default(faq_app):
    assert example_get(faq_app, "/wiki/") == (200, b"Wiki front page")


def test_faq_default_does_not_cover_other_nodes(faq_app):
    assert example_get(faq_app, "/nowhere")[0] == 404


def test_faq_reserved_name_print(faq_app):
    assert example_get(faq_app, "/print") == (200, b"Printer-friendly page")


def test_faq_reserved_name_class_exposed_by_attribute(faq_app):
    assert example_get(faq_app, "/class/7b") == (200, b"Class 7b")
    assert example_get(faq_app, "/class")[0] == 404


def test_faq_reserved_name_return(faq_app):
    assert example_get(faq_app, "/return", "item=book") == (200, b"Returned: book")
    assert example_get(faq_app, "/return") == (200, b"Returned: nothing")


def test_faq_sub_node_index(faq_app):
    assert example_get(faq_app, "/sub/") == (200, b"Sub-node index")
    assert example_get(faq_app, "/sub/page") == (200, b"A page below the sub-node")


def test_faq_sub_node_without_slash_redirects(faq_app):
    status, headers, _ = example_call(faq_app, "GET", "/sub")
    # A permanent redirect, as CherryPy does for a missing trailing slash.
    assert status == 301
    assert location_path(headers) == "/sub/"


def test_faq_method_dispatch(faq_app):
    status, headers, body = example_call(faq_app, "GET", "/items")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == []

    status, _, body = post_form(faq_app, "/items", {"name": "pencil"})
    assert (status, json.loads(body)) == (201, {"id": 0, "name": "pencil"})
    post_form(faq_app, "/items", {"name": "eraser"})

    status, _, body = example_call(faq_app, "GET", "/items")
    assert json.loads(body) == [{"id": 0, "name": "pencil"},
                                {"id": 1, "name": "eraser"}]
    status, _, body = example_call(faq_app, "GET", "/items/1")
    assert (status, json.loads(body)) == (200, {"id": 1, "name": "eraser"})
    assert example_call(faq_app, "GET", "/items/5")[0] == 404


def test_faq_method_dispatch_unknown_method_is_405(faq_app):
    status, headers, _ = example_call(faq_app, "DELETE", "/items")
    assert status == 405
    # RFC 9110 requires a 405 to list what is allowed.
    assert {"GET", "POST"} <= {m.strip() for m in headers["allow"].split(",")}
    assert example_call(faq_app, "PUT", "/items", body=b"name=x", headers=FORM)[0] == 405


def test_faq_repeated_query_name_becomes_list(faq_app):
    assert example_get(faq_app, "/search", "q=cats&tag=a&tag=b") == (
        200, b"q=cats; tags=a,b; page=1")


def test_faq_single_query_name_stays_string(faq_app):
    assert example_get(faq_app, "/search", "tag=solo&page=3") == (
        200, b"q=; tags=solo; page=3")


def test_faq_form_body_becomes_keyword_args(faq_app):
    fields = [("q", "dogs"), ("tag", "x"), ("tag", "y"), ("page", "2")]
    assert post_form(faq_app, "/search", fields)[::2] == (
        200, b"q=dogs; tags=x,y; page=2")


def test_faq_dict_is_returned_as_json(faq_app):
    status, headers, body = example_call(faq_app, "GET", "/status")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == {
        "status": "ok", "handlers": ["project", "report.xml", "search"]}


# ------------------------------------------------------------------- library

SEEDED = [
    {"id": 1, "title": "Pride and Prejudice", "author": "Jane Austen",
     "year": 1813},
    {"id": 2, "title": "Frankenstein", "author": "Mary Shelley", "year": 1818},
    {"id": 3, "title": "Moby-Dick", "author": "Herman Melville", "year": 1851},
]
XSS = "<script>alert('x')</script>"


@pytest.fixture
def lib(monkeypatch):
    monkeypatch.delenv("LIBRARY_DB", raising=False)
    return minipub.Application(library.Root())


def example_api(app, path):
    status, headers, body = example_call(app, "GET", path)
    assert headers["content-type"].startswith("application/json")
    return status, json.loads(body)


def test_library_root_redirects_to_book_list(lib):
    status, headers, _ = example_call(lib, "GET", "/")
    assert status == 303
    assert location_path(headers) == "/books/"


def test_library_lists_seeded_books(lib):
    status, headers, body = example_call(lib, "GET", "/books/")
    assert status == 200
    assert headers["content-type"] == HTML
    assert b"<h1>All books</h1>" in body
    for book in SEEDED:
        assert ('<a href="/books/%d">%s</a> by %s' % (
            book["id"], book["title"], book["author"])).encode() in body


def test_library_search_by_author_case_insensitive(lib):
    status, _, body = example_call(lib, "GET", "/books/", "q=AUSTEN")
    assert status == 200
    assert b"Pride and Prejudice" in body
    assert b"Moby-Dick" not in body and b"Frankenstein" not in body
    assert b'value="AUSTEN"' in body


def test_library_search_by_title(lib):
    body = example_call(lib, "GET", "/books/", "q=moby")[2]
    assert b"Moby-Dick" in body
    assert b"Pride and Prejudice" not in body


def test_library_search_without_match(lib):
    body = example_call(lib, "GET", "/books/", "q=nothing+like+this")[2]
    assert b"<p>No books found.</p>" in body


def test_library_search_treats_percent_literally(lib):
    body = example_call(lib, "GET", "/books/", "q=%25")[2]
    assert b"<p>No books found.</p>" in body


def test_library_book_page(lib):
    status, _, body = example_call(lib, "GET", "/books/2")
    assert status == 200
    assert b"<h1>Frankenstein</h1>" in body
    assert b"<p>by Mary Shelley, 1818</p>" in body
    assert b'href="/books/2/edit"' in body


@pytest.mark.parametrize("path", [
    "/books/99", "/books/abc", "/books/99/edit", "/books/1/bogus",
    "/api/books/99", "/api/books/abc", "/api/books/1/2",
])
def test_library_missing_is_404(lib, path):
    assert example_call(lib, "GET", path)[0] == 404


def test_library_add_form(lib):
    status, _, body = example_call(lib, "GET", "/books/new")
    assert status == 200
    assert b'<form action="/books/new" method="post">' in body
    assert b'<input name="title" value="">' in body


def test_library_add_book(lib):
    status, headers, body = post_form(lib, "/books/new", {
        "title": "Dracula", "author": "Bram Stoker", "year": "1897"})
    assert status == 303
    assert location_path(headers) == "/books/4"
    body = example_call(lib, "GET", "/books/4")[2]
    assert b"<h1>Dracula</h1>" in body
    assert b"<p>by Bram Stoker, 1897</p>" in body
    assert example_api(lib, "/api/books/4") == (200, {
        "id": 4, "title": "Dracula", "author": "Bram Stoker", "year": 1897})
    assert b"Dracula" in example_call(lib, "GET", "/books/", "q=stoker")[2]


def test_library_add_book_without_year(lib):
    status, headers, _ = post_form(lib, "/books/new", {
        "title": "Beowulf", "author": "Anonymous", "year": ""})
    assert (status, location_path(headers)) == (303, "/books/4")
    assert example_api(lib, "/api/books/4")[1]["year"] is None
    assert b"<p>by Anonymous, year unknown</p>" in example_call(lib, "GET", "/books/4")[2]


def test_library_add_uses_first_of_repeated_field(lib):
    post_form(lib, "/books/new", [("title", "First"), ("title", "Second"),
                                  ("author", "A. N. Author")])
    assert example_api(lib, "/api/books/4")[1]["title"] == "First"


@pytest.mark.parametrize("fields, message", [
    ({"title": "", "author": "Someone"}, b"Title and author are required."),
    ({"title": "Something", "author": "  "}, b"Title and author are required."),
    ({"title": "T", "author": "A", "year": "19x"}, b"Year must be a whole number."),
])
def test_library_add_rejects_invalid_input(lib, fields, message):
    status, _, body = post_form(lib, "/books/new", fields)
    assert status == 400
    assert b'<p class="error">' + message + b"</p>" in body
    assert len(example_api(lib, "/api/books")[1]) == 3


def test_library_add_rejects_other_methods(lib):
    assert example_call(lib, "DELETE", "/books/new")[0] == 405


def test_library_edit_form_is_prefilled(lib):
    status, _, body = example_call(lib, "GET", "/books/1/edit")
    assert status == 200
    assert b"<h1>Edit Pride and Prejudice</h1>" in body
    assert b'<form action="/books/1/edit" method="post">' in body
    assert b'<input name="title" value="Pride and Prejudice">' in body
    assert b'<input name="author" value="Jane Austen">' in body
    assert b'<input name="year" value="1813">' in body


def test_library_edit_book(lib):
    status, headers, _ = post_form(lib, "/books/1/edit", {
        "title": "Emma", "author": "Jane Austen", "year": "1815"})
    assert (status, location_path(headers)) == (303, "/books/1")
    assert example_api(lib, "/api/books/1") == (200, {
        "id": 1, "title": "Emma", "author": "Jane Austen", "year": 1815})
    assert len(example_api(lib, "/api/books")[1]) == 3


def test_library_edit_rejects_invalid_input(lib):
    status, _, body = post_form(lib, "/books/1/edit", {
        "title": "", "author": "Jane Austen"})
    assert status == 400
    assert b"Title and author are required." in body
    assert example_api(lib, "/api/books/1")[1] == SEEDED[0]


def test_library_api_lists_books(lib):
    assert example_api(lib, "/api/books") == (200, SEEDED)


def test_library_api_one_book(lib):
    assert example_api(lib, "/api/books/2") == (200, SEEDED[1])


def test_library_escapes_script_title(lib):
    status, headers, _ = post_form(lib, "/books/new", {
        "title": XSS, "author": 'Eve "quote" <b>', "year": ""})
    assert (status, location_path(headers)) == (303, "/books/4")
    escaped = html.escape(XSS).encode()
    assert escaped == b"&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    pages = [example_call(lib, "GET", "/books/4")[2],
             example_call(lib, "GET", "/books/")[2],
             example_call(lib, "GET", "/books/", "q=script")[2],
             example_call(lib, "GET", "/books/4/edit")[2]]
    for body in pages:
        assert b"<script>" not in body and b"<b>" not in body
        assert escaped in body
    assert b'value="Eve &quot;quote&quot; &lt;b&gt;"' in pages[3]
    # JSON carries the raw text; escaping is the HTML view's business.
    assert example_api(lib, "/api/books/4")[1]["title"] == XSS


def test_library_escapes_search_query_and_invalid_form(lib):
    body = example_call(lib, "GET", "/books/", "q=" + urlencode({"": XSS})[1:])[2]
    assert b"<script>" not in body
    assert b'value="' + html.escape(XSS).encode() + b'"' in body
    status, _, body = post_form(lib, "/books/new", {"title": XSS, "author": ""})
    assert status == 400
    assert b"<script>" not in body
    assert b'value="' + html.escape(XSS).encode() + b'"' in body


def test_library_database_file_persists_and_seeds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LIBRARY_DB", str(tmp_path / "books.sqlite3"))
    first = minipub.Application(library.Root())
    post_form(first, "/books/new", {"title": "Kept", "author": "Someone"})
    second = minipub.Application(library.Root())
    books = example_api(second, "/api/books")[1]
    assert [book["title"] for book in books] == [
        "Pride and Prejudice", "Frankenstein", "Moby-Dick", "Kept"]


def test_notes_example_config_file_static_json_and_error_page():
    from examples import notes
    app = notes.app
    status, headers, body = call_app(app, path="/static/style.css", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip" and b"font" in zlib.decompress(body, 31)
    post = {"Content-Type": "application/json"}
    status, headers, body = call_app(app, "POST", "/api/notes", body=b'{"text": " buy milk "}', headers=post)
    assert status == 201 and json.loads(body)["text"] == "buy milk"
    assert json.loads(call_app(app, path="/api/notes/%d" % json.loads(body)["id"])[2])["text"] == "buy milk"
    assert call_app(app, "POST", "/api/notes", body=b"[1]", headers=post)[0] == 400
    status, headers, body = call_app(app, path="/api/notes/999")
    assert status == 404 and json.loads(body)["message"] == "There is no note 999."
    status, headers, body = call_app(app, path="/nowhere")
    assert status == 404 and b"Back to the notes" in body  # error_page.404 from _cp_config


def test_notes_example_runs_as_a_cherrypy_style_script():
    port = free_port()
    code = "import sys; sys.argv[1:] = []; import minipub; minipub.config.update({'server.socket_port': %d}); " \
           "import runpy; runpy.run_module('examples.notes', run_name='__main__')" % port
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        assert b"Notes" in urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5).read()
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.parametrize("name,path,expected", [
    ("hello", "/", b"Hello, world!"),
    ("faq", "/report.xml", b"<"),
    ("library", "/api/books", b"["),
    ("notes:app", "/api/notes", b'{"notes"'),
])
def test_example_runs_from_the_command_line(name, path, expected):
    port = free_port()
    target = "examples.%s" % name if ":" in name else "examples.%s:Root" % name
    proc = subprocess.Popen([sys.executable, "minipub.py", target, "--port", str(port),
                             "--log.screen", "false"], cwd=HERE)
    try:
        wait_for_port(port, proc)
        assert urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5).read().startswith(expected)
    finally:
        proc.terminate()
        proc.wait(15)


# ===========================================================================
# Hostile clients and load
# ===========================================================================

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


def h_get(target=b"/", fields=b"", version=b"HTTP/1.1"):
    return b"GET " + target + b" " + version + b"\r\nHost: x\r\n" + fields + b"\r\n"


def _rst(sock):
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


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


# -- limits at the limit and one past -------------------------------------------

LINE_MAX = 8 * 1024


@pytest.mark.parametrize("step", [None, 1, 7])
def test_hostile_request_line_limit(step):
    at = h_get(b"/" + b"a" * (LINE_MAX - len(b"GET / HTTP/1.1")))
    assert len(at.split(b"\r\n")[0]) == LINE_MAX
    assert _feed(at, step=step)[0].target.endswith(b"a".decode() * 10)
    past = h_get(b"/" + b"a" * (LINE_MAX + 1 - len(b"GET / HTTP/1.1")))
    with pytest.raises(minipub.ProtocolError) as err:
        _feed(past, step=step)
    assert err.value.status == 414


@pytest.mark.parametrize("step", [None, 1, 13])
def test_hostile_header_count_limit(step):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(99))  # + Host = 100
    assert len(_feed(h_get(b"/", fields), step=step)[0].headers) == 100
    with pytest.raises(minipub.ProtocolError) as err:
        _feed(h_get(b"/", fields + b"X-Extra: v\r\n"), step=step)
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
    (h_get(b"/" + b"a" * (LINE_MAX - 14)), 200),
    (h_get(b"/" + b"a" * (LINE_MAX - 13)), 414),
    (h_get(b"/", b"".join(b"X-F%d: v\r\n" % i for i in range(99))), 200),
    (h_get(b"/", b"".join(b"X-F%d: v\r\n" % i for i in range(100))), 431),
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
    raw = exchange(server.port, data + h_get(b"/", b"Connection: close\r\n"))
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
    order, release, entered = [], threading.Event(), threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/a0":  # hold the only worker until B's head is queued
            entered.set()
            release.wait(5)
        order.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    for count in (16, 17):
        order.clear()
        release.clear()
        entered.clear()
        server = serve(app, thread_pool=1, max_pipelined_requests=16)
        a = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        a.sendall(b"".join(h_get(b"/a%d" % i) for i in range(count)))
        assert entered.wait(5) and order == [] and len(server._pending) == 0
        b = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        b.sendall(h_get(b"/b"))
        assert wait_until(lambda: len(server._pending) == 1)
        release.set()
        assert wait_until(lambda: len(order) == count + 1)
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
        raw, closed = recv_until_close(sock)
    assert raw == b"" and closed and time.monotonic() - start < 3


def test_hostile_keepalive_idle_timeout(serve):
    server = serve(hello_app, keepalive_timeout=0.3)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(h_get())
        start = time.monotonic()
        raw, closed = recv_until_close(sock)
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


def test_a_body_that_stops_arriving_gets_408_from_the_poll_role(serve):
    server = serve(hello_app, socket_timeout=0.3, thread_pool=1)
    started = time.monotonic()
    raw = exchange(server.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    assert _status(raw) == 408 and time.monotonic() - started < 2 and not server._pool.done


def test_hostile_connection_cap_answers_503_at_once(serve):
    server = serve(hello_app, max_connections=3)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    held[0].sendall(h_get())  # one busy keep-alive, two silent: all count
    assert responses(held[0].recv(65536))[0][0] == 200
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as fourth:
        fourth.sendall(h_get())
        raw, closed = recv_until_close(fourth)
    assert _status(raw) == 503 and closed and time.monotonic() - start < 1
    assert b"nosniff" in raw
    held.pop().close()
    assert wait_until(lambda: _status(exchange(server.port, h_get(b"/", b"Connection: close\r\n"))) == 200)
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
    # body_buffer_size below the uploads' length: the poll role spools them to temporary files
    server = minipub.Server(app, "127.0.0.1", 0, thread_pool=2, body_buffer_size=1000).start()
    port, ok = server.port, h_get(b"/", b"Connection: close\r\n")
    try:
        for round_ in range(3):
            _rst(socket.create_connection(("127.0.0.1", port)))  # before the request
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET / HTTP/1.1\r\nHo")  # mid-head
            _rst(sock)
            for path in (b"/upload", b"/raw-upload"):  # mid-body, framework and bare WSGI
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                             b"Content-Type: application/octet-stream\r\n\r\n" + b"b" * 2000)
                assert wait_until(lambda: any(c.body.file for c in list(server._poll.timers["body"])), 5)
                _rst(sock)
            assert not entered.is_set()  # an application never sees a body that is not all there
            closed.clear()
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(h_get(b"/stream"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")  # mid-response
            _rst(sock)
            assert closed.wait(5)  # the app's iterable was closed
            assert exchange(port, ok).endswith(b"hello ")
        assert wait_until(lambda: len(server._conns) == 0)
    finally:
        server.stop(10)
    assert not [r.getMessage() for r in error_records]
    assert wait_until(lambda: threading.active_count() == threads)
    assert wait_until(lambda: _fd_count() == fds)


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
    raw = exchange(serve(app).port, h_get(b"/", b"Connection: close\r\n"))
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
        h_get(), h_get(b"/p?q=1", b"Accept: */*\r\nCookie: a=b\r\n"),
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
    raw = exchange(server.port, _chunked([b"a" * 999, b"bc"]) + h_get())
    answers = responses(raw)
    assert [a[0] for a in answers] == [413] and answers[0][1]["connection"] == "close"
