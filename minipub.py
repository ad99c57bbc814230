"""minipub: a one-file HTTP/1.1 server and object-tree web framework.

Copy this file next to your code, then::

    # app.py
    import minipub

    class Root:
        @minipub.expose
        def index(self):
            return "Hello, world!"

    $ python minipub.py app:Root          # serves http://127.0.0.1:8080/

Standard library only; CPython 3.9 to 3.13.  The application object is a
PEP 3333 callable, so the same code also runs under gunicorn or uWSGI.

The file reads in the order a request flows: configuration and limits,
errors, the server (accept, poll, workers: all socket I/O), the HTTP/1.1
parser (pure, no I/O), the WSGI bridge, the application and its dispatch,
tools (auth, static files, uploads), the reloader, and the command line.
"""
# MIT License
#
# Copyright (c) 2026 the minipub developers
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to
# deal in the Software without restriction, including without limitation the
# rights to use, copy, modify, merge, publish, distribute, sublicense, and/or
# sell copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in
# all copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING
# FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS
# IN THE SOFTWARE.

import os
import re
import selectors
import socket
import socketserver
import sys
import threading
import time
from collections import deque

__version__ = "0.1.0"
__all__ = [
    "expose", "request", "response", "Application", "Server", "quickstart",
    "HTTPError", "HTTPRedirect", "NotFound", "ProtocolError", "ConfigError",
    "RequestParser", "RequestHead", "LIMITS", "make_config", "load_config",
    "main",
]

# Heavy modules (ssl, json, inspect, logging, email, tempfile, urllib.parse,
# argparse, configparser) are imported inside the functions that need them,
# so ``import minipub`` stays cheap and an idle server stays small.


def _logger(name: str = "error"):
    import logging
    return logging.getLogger("minipub." + name)


# ===========================================================================
# Configuration and limits
# Contract: every tunable is one row of LIMITS (key, default, unit, why).
# make_config() accepts only those keys and values of the row's type; the
# INI loader and the CLI options are generated from the same rows.
# ===========================================================================

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

LIMITS = (
    ("server.socket_host", "127.0.0.1", "host",
     "loopback unless asked: exposing a server is a decision; 0.0.0.0 or :: for all"),
    ("server.socket_port", 8080, "port", "CherryPy's default; 0 picks a free port"),
    ("server.thread_pool", 10, "threads",
     "workers that run the application; waiting clients never hold one"),
    ("server.socket_timeout", 10.0, "seconds",
     "longest single wait for a client to send or receive inside a request"),
    ("server.head_timeout", 20.0, "seconds",
     "deadline for a whole request head (408): dribbling one byte a second cannot keep it open"),
    ("server.keepalive_timeout", 5.0, "seconds", "an idle keep-alive connection is closed after this"),
    ("server.max_request_line_size", 8 * KiB, "bytes", "longer request line: 414"),
    ("server.max_request_header_size", 64 * KiB, "bytes", "larger header section: 431"),
    ("server.max_header_count", 100, "fields", "more header fields: 431"),
    ("server.max_request_body_size", 1 * GiB, "bytes", "larger body: 413; 0 means unlimited"),
    ("server.max_chunk_extension_size", 1 * KiB, "bytes",
     "chunk extensions are ignored, so they may not be used to send unbounded data: 400"),
    ("server.min_body_rate", 1024, "bytes/s",
     "after socket_timeout of grace a slower upload is cut with 408"),
    ("server.max_connections", 4096, "connections",
     "beyond this new clients get 503 at once instead of hanging"),
    ("server.max_pipelined_requests", 16, "requests",
     "requests answered from read-ahead before the connection yields its worker"),
    ("server.shutdown_timeout", 10.0, "seconds", "in-flight requests get this long on stop"),
    ("server.trusted_proxies", (), "addresses",
     "peers whose Forwarded / X-Forwarded-* headers are believed"),
    ("server.ssl_certificate", "", "path", "PEM certificate; with ssl_private_key turns on HTTPS"),
    ("server.ssl_private_key", "", "path", "PEM private key of ssl_certificate"),
    ("server.ssl_certificate_chain", "", "path", "PEM intermediates sent after the certificate"),
    ("request.show_tracebacks", False, "flag", "tracebacks in 500 pages: for development only"),
    ("request.max_form_parts", 1000, "parts", "fields plus files in one form body: 413 beyond"),
    ("request.max_form_field_size", 1 * MiB, "bytes",
     "one non-file form field, or a whole urlencoded body: 413 beyond"),
    ("request.upload_spool_size", 1 * MiB, "bytes",
     "an uploaded file stays in memory up to this size, then moves to a temporary file"),
    ("log.screen", True, "flag", "error and access log on stderr"),
    ("log.access_file", "", "path", "append the access log (Common Log Format) here"),
    ("log.error_file", "", "path", "append the error log (with tracebacks) here"),
    ("engine.autoreload.on", False, "flag", "restart the app in a new process when its files change"),
    ("engine.autoreload.frequency", 1.0, "seconds", "how often the reloader polls"),
    ("engine.autoreload.files", (), "paths", "extra files the reloader watches"),
)

_UNIT_TYPES = {
    "host": str, "path": str, "flag": bool, "seconds": float, "addresses": tuple,
    "paths": tuple, "port": int, "threads": int, "bytes": int, "fields": int,
    "bytes/s": int, "connections": int, "requests": int, "parts": int,
}
_ROWS = {row[0]: row for row in LIMITS}


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


def _convert(key: str, value):
    unit = _ROWS[key][2]
    want = _UNIT_TYPES[unit]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif want is tuple and isinstance(value, (list, str)):
        value = (value,) if isinstance(value, str) else tuple(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError("config key %r wants %s (%s), got %r" % (key, want.__name__, unit, value))
    if want in (int, float) and value < 0:
        raise ConfigError("config key %r must not be negative, got %r" % (key, value))
    return value


def make_config(overrides=None) -> dict:
    """Defaults from LIMITS updated with ``overrides``; unknown keys raise ConfigError."""
    config = {row[0]: row[1] for row in LIMITS}
    for key, value in (overrides or {}).items():
        if key not in _ROWS:
            raise ConfigError("unknown config key %r" % (key,))
        config[key] = _convert(key, value)
    return config


def load_config(path: str) -> dict:
    """Read an INI file's ``[global]`` section; values are Python literals, never executed."""
    import ast
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive, like CherryPy's
    if not parser.read(path, encoding="utf-8"):
        raise ConfigError("cannot read config file %r" % (path,))
    unknown = [s for s in parser.sections() if s != "global"]
    if unknown:
        raise ConfigError("%s: unknown section [%s]; use [global]" % (path, unknown[0]))
    values = {}
    for key, text in parser.items("global") if parser.has_section("global") else ():
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError("%s: %s = %s is not a Python literal (quote strings)"
                              % (path, key, text)) from None
    return make_config(values)


# ===========================================================================
# Errors
# Contract: HTTPError and its subclasses carry the status to answer with.
# ProtocolError is what the parser raises for bad framing; after one the
# server answers once and closes the connection.
# ===========================================================================

class HTTPError(Exception):
    """Answer the request with ``status`` and an HTML page showing ``message``."""

    def __init__(self, status: int = 500, message: str = None):
        self.status = int(status)
        self.message = message
        super().__init__(status, message)


class NotFound(HTTPError):
    def __init__(self, message: str = None):
        super().__init__(404, message)


class HTTPRedirect(Exception):
    """Redirect to ``url`` (made absolute against the request) with a 3xx status."""

    def __init__(self, url: str, status: int = 303):
        if not 300 <= int(status) <= 399:
            raise ValueError("redirect status must be 3xx, not %r" % (status,))
        self.url = url
        self.status = int(status)
        super().__init__(url, status)


class ProtocolError(HTTPError):
    """The bytes on the wire are not acceptable HTTP/1.1; the connection closes."""


class _ClientGone(Exception):
    """The peer closed or reset the connection; nothing more can be sent."""


class _Timeout(Exception):
    """The peer was too slow for a deadline; answered with 408 when possible."""


# ===========================================================================
# Server: accept, poll, workers
# Contract: all socket I/O lives in this section.  One poller thread owns the
# listening socket and every connection that is *waiting*: for its TLS
# handshake, for the rest of its request head, or idle between keep-alive
# requests.  It never blocks on a client, so slow or silent clients cost a
# file descriptor, not a thread.  When a head is complete the connection goes
# to a bounded pool of worker threads, which read the body (wsgi.input), run
# the WSGI application and write the response, then hand the connection back
# to the poller or close it.  With nothing to do the poller sleeps in select()
# without a timeout: an idle server makes no periodic wake-ups.
# ===========================================================================

_ACCEPT, _WAKE, _QUEUED = object(), object(), object()
# Keep-alive clients usually send their next request within microseconds of
# reading a response; a worker waits this long for it before handing the
# connection back, which saves two thread hand-offs per request under load.
_LINGER = 0.0015
_RECV = 256 * KiB


class _Listener(socketserver.TCPServer):
    """socketserver's binding (SO_REUSEADDR, backlog) for one address family."""

    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address, family):
        self.address_family = family
        super().__init__(address, None, bind_and_activate=False)

    def server_bind(self):
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # '::' means every interface, IPv4 included where the OS allows.
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (AttributeError, OSError):
                pass
        super().server_bind()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for ``host`` (name, IPv4, IPv6, 0.0.0.0 or ::)."""
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listener = _Listener(address, family)
    try:
        listener.server_bind()
        listener.server_activate()
    except OSError:
        listener.server_close()
        raise
    return listener.socket


class _Conn:
    """A client connection and the parser that owns its buffered bytes."""

    __slots__ = ("sock", "addr", "parser", "head", "deadline", "handshaking", "tls")

    def __init__(self, sock, addr, parser, tls):
        self.sock, self.addr, self.parser, self.tls = sock, addr, parser, tls
        self.head = self.deadline = None
        self.handshaking = tls


class Server:
    """A threaded HTTP/1.1 server for any PEP 3333 application.

    ``options`` are the ``server.*`` keys of LIMITS without the prefix, e.g.
    ``Server(app, "127.0.0.1", 0, thread_pool=4)``.  ``sock`` adopts an
    already listening socket (the reloader hands one to each child).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8080, *, sock=None,
                 ssl_context=None, config: dict = None, **options):
        overrides = dict(config or {})
        overrides.update(("server." + k, v) for k, v in options.items())
        overrides.update({"server.socket_host": host, "server.socket_port": port})
        self.config = make_config(overrides)
        self.app, self.host, self.port = app, host, port
        self.ssl_context = ssl_context
        self._sock, self._thread, self._workers = sock, None, []
        self._conns, self._waiting, self._handback = set(), {}, deque()
        self._timers = {"head": deque(), "keepalive": deque()}
        self._stopping = False
        self._ready = threading.Event()
        self._want = (BlockingIOError, InterruptedError)
        self._access = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "Server":
        """Bind and serve in a background thread; returns once accepting."""
        self._prepare()
        self._thread = threading.Thread(target=self._loop, name="minipub-poller", daemon=True)
        self._thread.start()
        self._ready.wait()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until stop(), Ctrl-C or SIGTERM."""
        self._prepare()
        restore = self._install_signals()
        try:
            self._loop()
        finally:
            restore()

    def stop(self, timeout: float = None) -> None:
        """Stop accepting, let in-flight requests finish, close everything."""
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def urls(self) -> list:
        scheme = "https" if self.ssl_context else "http"
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            return ["%s://%s:%d/ (all interfaces)" % (scheme, "[::]" if host == "::" else host, self.port)]
        return ["%s://%s:%d/" % (scheme, "[%s]" % host if ":" in host else host, self.port)]

    def _prepare(self):
        if self.ssl_context is None and self.config["server.ssl_certificate"]:
            self.ssl_context = make_ssl_context(self.config)
        if self.ssl_context is not None:
            import ssl
            self._want += (ssl.SSLWantReadError, ssl.SSLWantWriteError)
        if self._sock is None:
            self._sock = bind_socket(self.host, self.port)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._work = __import__("queue").SimpleQueue()
        access = _logger("access")
        if access.isEnabledFor(20) and (access.handlers or not access.propagate):
            self._access = access.info
        for i in range(self.config["server.thread_pool"]):
            worker = threading.Thread(target=self._worker, name="minipub-%d" % i, daemon=True)
            worker.start()
            self._workers.append(worker)

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # embedded in a thread: the host program owns signals
        import signal

        def on_signal(signum, frame):
            self._stopping = True
            self._wake()
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    # -- the poller --------------------------------------------------------
    def _loop(self):
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, _ACCEPT)
        sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._ready.set()
        try:
            while not self._stopping:
                for key, _ in sel.select(self._next_timeout()):
                    if key.data is _ACCEPT:
                        self._accept(sel)
                    elif key.data is _WAKE:
                        self._take_back(sel)
                    else:
                        self._readable(sel, key.data)
                self._expire(sel)
        finally:
            self._shutdown(sel)

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except (AttributeError, OSError):
            pass  # not started yet, or the pipe is full: a wake-up is pending anyway

    def _accept(self, sel):
        for _ in range(64):
            try:
                sock, addr = self._sock.accept()
            except self._want:
                return
            except OSError as exc:  # EMFILE and friends: log once per burst, keep serving
                _logger().warning("accept failed: %s", exc)
                return
            if len(self._conns) >= self.config["server.max_connections"]:
                self._refuse(sock)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
            conn = _Conn(sock, addr, RequestParser(self.config), self.ssl_context is not None)
            self._conns.add(conn)
            self._wait(sel, conn, "head")

    def _refuse(self, sock):
        try:
            sock.send(_simple_response(503, "Too many connections; try again later.\n"))
        except OSError:
            pass
        sock.close()

    def _wait(self, sel, conn, kind):
        conn.deadline = time.monotonic() + self.config["server.%s_timeout" % kind]
        self._timers[kind].append((conn.deadline, conn))
        if conn not in self._waiting:
            sel.register(conn.sock, selectors.EVENT_READ, conn)
        self._waiting[conn] = kind

    def _unwait(self, sel, conn):
        del self._waiting[conn]
        conn.deadline = None
        sel.unregister(conn.sock)

    def _readable(self, sel, conn):
        if conn.handshaking and not self._handshake(sel, conn):
            return
        while True:
            try:
                data = conn.sock.recv(_RECV)
            except self._want:
                return
            except OSError:
                return self._drop(sel, conn)
            if not data:
                return self._drop(sel, conn)
            if self._waiting[conn] == "keepalive":
                self._wait(sel, conn, "head")  # the head deadline starts at its first byte
            conn.parser.receive(data)
            try:
                head = conn.parser.next_event()
            except ProtocolError as err:
                self._unwait(sel, conn)
                return self._reject(conn, err)
            if head is not NEED_DATA:
                self._unwait(sel, conn)
                conn.head = head
                return self._work.put(conn)
            if not (conn.tls and conn.sock.pending()):
                return  # TLS may hold decrypted bytes that select() cannot see

    def _handshake(self, sel, conn):
        import ssl
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            sel.modify(conn.sock, selectors.EVENT_READ, conn)
            return False
        except ssl.SSLWantWriteError:
            sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return False
        except (ssl.SSLError, OSError) as exc:
            if getattr(exc, "reason", "") == "HTTP_REQUEST":  # plain HTTP on the TLS port
                try:
                    os.write(conn.sock.fileno(), _simple_response(
                        400, "This port speaks HTTPS; use an https:// URL.\n"))
                except OSError:
                    pass
            return self._drop(sel, conn)
        conn.handshaking = False
        sel.modify(conn.sock, selectors.EVENT_READ, conn)
        return True

    def _reject(self, conn, err):
        """Answer a framing error from the poller (non-blocking) and close."""
        try:
            conn.sock.send(_simple_response(err.status, err.message))
        except OSError:
            pass
        self._close(conn)

    def _drop(self, sel, conn):
        if conn in self._waiting:
            self._unwait(sel, conn)
        self._close(conn)

    def _close(self, conn):
        self._conns.discard(conn)
        try:
            conn.sock.close()
        except OSError:
            pass

    def _take_back(self, sel):
        try:
            while self._wake_r.recv(4096):
                pass
        except self._want:
            pass
        while self._handback:
            conn = self._handback.popleft()
            if self._stopping:
                self._close(conn)
            else:
                self._wait(sel, conn, "head" if conn.parser.buffered else "keepalive")
                if conn.tls and conn.sock.pending():
                    self._readable(sel, conn)

    def _next_timeout(self):
        soonest = None
        for timers in self._timers.values():
            while timers and timers[0][1].deadline != timers[0][0]:
                timers.popleft()  # stale: that connection moved on
            if timers and (soonest is None or timers[0][0] < soonest):
                soonest = timers[0][0]
        return None if soonest is None else max(0.0, soonest - time.monotonic())

    def _expire(self, sel):
        now = time.monotonic()
        for kind, timers in self._timers.items():
            while timers and (timers[0][1].deadline != timers[0][0] or timers[0][0] <= now):
                deadline, conn = timers.popleft()
                if conn.deadline == deadline:
                    self._unwait(sel, conn)
                    if conn.parser.buffered:
                        self._reject(conn, ProtocolError(408, "Request head took too long.\n"))
                    else:
                        self._close(conn)
            if len(timers) > 2 * len(self._waiting) + 64:  # drop stale entries, keep order
                self._timers[kind] = deque(t for t in timers if t[1].deadline == t[0])

    def _shutdown(self, sel):
        self._stopping = True
        for conn in list(self._waiting):
            self._drop(sel, conn)
        sel.close()
        self._sock.close()
        for _ in self._workers:
            self._work.put(None)
        deadline = time.monotonic() + self.config["server.shutdown_timeout"]
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for conn in list(self._conns):  # stragglers past the deadline
            self._close(conn)
        self._wake_r.close()
        self._wake_w.close()

    # -- workers -----------------------------------------------------------
    def _worker(self):
        while True:
            conn = self._work.get()
            if conn is None:
                return
            try:
                keep = self._serve(conn)
            except _ClientGone:
                keep = False
            except Exception:  # a bug in minipub itself: never let a worker die
                _logger().exception("internal error serving %s", conn.addr)
                keep = False
            if keep is _QUEUED:
                continue
            if keep:
                conn.sock.setblocking(False)
                self._handback.append(conn)
                self._wake()
            else:
                self._close(conn)

    def _serve(self, conn) -> bool:
        """Answer requests on ``conn``; True hands it back to the poller."""
        conn.sock.settimeout(self.config["server.socket_timeout"])
        for _ in range(self.config["server.max_pipelined_requests"]):
            if not _Exchange(self, conn).run() or self._stopping:
                return False
            try:
                head = conn.parser.next_event()
                if head is NEED_DATA and not conn.parser.buffered:
                    head = self._linger(conn)
            except ProtocolError as err:
                _Exchange(self, conn).fail(err.status, err.message)
                return False
            if head is NEED_DATA:
                return True
            conn.head = head
        self._work.put(conn)  # fairness: a deep pipeline goes to the back of the queue
        return _QUEUED

    def _linger(self, conn):
        try:
            conn.sock.settimeout(_LINGER)
            data = conn.sock.recv(_RECV)
        except (socket.timeout,) + self._want:
            return NEED_DATA
        except OSError:
            raise _ClientGone() from None
        finally:
            conn.sock.settimeout(self.config["server.socket_timeout"])
        if not data:
            raise _ClientGone()
        conn.parser.receive(data)
        return conn.parser.next_event()

    def recv(self, conn, timeout: float) -> None:
        """Feed the parser more bytes of ``conn``; the body reader calls this."""
        try:
            conn.sock.settimeout(max(timeout, 0.001))
            data = conn.sock.recv(_RECV)
        except socket.timeout:
            raise _Timeout() from None
        except OSError:
            raise _ClientGone() from None
        if not data:
            raise _ClientGone()
        conn.parser.receive(data)

    def send(self, conn, data) -> None:
        try:
            conn.sock.sendall(data)
        except OSError:  # includes socket.timeout: a client that stopped reading
            raise _ClientGone() from None

    def sendfile(self, conn, file, offset: int, count: int) -> None:
        """Zero-copy on plain sockets; TLS falls back to a buffered loop."""
        try:
            if conn.tls:
                file.seek(offset)
                while count > 0:
                    block = file.read(min(count, _RECV))
                    if not block:
                        raise _ClientGone()  # the file shrank under us
                    conn.sock.sendall(block)
                    count -= len(block)
            else:
                conn.sock.sendfile(file, offset, count)
        except OSError:
            raise _ClientGone() from None


def make_ssl_context(config: dict):
    """A server-side TLS context from the ``server.ssl_*`` keys."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.set_alpn_protocols(["http/1.1"])
    _load_chain(context, config["server.ssl_certificate"], config["server.ssl_private_key"],
                config["server.ssl_certificate_chain"])
    return context


def _load_chain(context, certfile, keyfile, chainfile):
    if not chainfile:
        return context.load_cert_chain(certfile, keyfile or None)
    # ssl takes intermediates only from the certificate file, so join the two.
    import tempfile
    with open(certfile, "rb") as cert, open(chainfile, "rb") as chain:
        joined = cert.read().rstrip(b"\n") + b"\n" + chain.read()
    with tempfile.NamedTemporaryFile(suffix=".pem") as tmp:
        tmp.write(joined)
        tmp.flush()
        context.load_cert_chain(tmp.name, keyfile or None)


# ===========================================================================
# HTTP/1.1 parser (RFC 9112), no I/O
# Contract: a RequestParser is fed bytes with receive() and asked for events
# with next_event(): a RequestHead, a bytes object of body data,
# END_OF_MESSAGE (after which the next request may follow), or NEED_DATA.
# Bad input raises ProtocolError carrying the status to answer (400, 413,
# 414, 417, 431, 501, 505); the parser then stays failed, so no byte after
# the error is ever read as a request.  Only SP and HTAB are whitespace.
# ===========================================================================

class _Event:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


NEED_DATA, END_OF_MESSAGE, _AGAIN = _Event("NEED_DATA"), _Event("END_OF_MESSAGE"), _Event("AGAIN")

# tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~"
#         / DIGIT / ALPHA; minus "_" in field names (see _field)
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(rb"[%s]+" % _TCHAR)
# request-line = method SP request-target SP HTTP-version ; exactly one SP each
_REQUEST_LINE = re.compile(rb"([%s]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])" % _TCHAR)
# field-value = *field-content ; field-vchar = VCHAR / obs-text, SP and HTAB inside
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]{1,18}")          # Content-Length = 1*DIGIT, bounded
_HEXDIGITS = re.compile(rb"[0-9A-Fa-f]{1,16}")  # chunk-size = 1*HEXDIG, bounded
# Host = uri-host [ ":" port ] ; uri-host = IP-literal / IPv4address / reg-name
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]{0,5})?")
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)")


class RequestHead:
    """The request line and header fields, with the framing they imply."""

    __slots__ = ("method", "target", "version", "headers", "path", "query", "host",
                 "scheme", "content_length", "chunked", "keep_alive", "expect_continue")

    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.path, self.query, self.host, self.scheme = target, "", None, None
        self.content_length, self.chunked = None, False
        self.keep_alive, self.expect_continue = version == "HTTP/1.1", False

    def __repr__(self):
        return "<RequestHead %s %s %s>" % (self.method, self.target, self.version)


class RequestParser:
    """Turns received bytes into request events; see the section contract."""

    def __init__(self, config: dict = None):
        config = config or make_config()
        self.max_line = config["server.max_request_line_size"]
        self.max_header = config["server.max_request_header_size"]
        self.max_fields = config["server.max_header_count"]
        self.max_body = config["server.max_request_body_size"]
        self.max_ext = config["server.max_chunk_extension_size"]
        self.buffer = bytearray()
        self.error = None
        self._state = self._head
        self._scanned = 0
        self._remaining = self._total = 0

    def receive(self, data: bytes) -> None:
        self.buffer += data

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    @property
    def in_body(self) -> bool:
        """True between a RequestHead and its END_OF_MESSAGE."""
        return self._state != self._head

    def next_event(self, max_bytes: int = _RECV):
        if self.error is not None:
            raise self.error
        try:
            event = self._state(max_bytes)
            while event is _AGAIN:
                event = self._state(max_bytes)
            return event
        except ProtocolError as err:
            self.error = err
            raise

    # -- the head ----------------------------------------------------------
    def _head(self, max_bytes):
        buf = self.buffer
        # RFC 9112 2.2: "a server that is expecting to receive and parse a
        # request-line SHOULD ignore at least one empty line (CRLF) received
        # prior to the request-line."
        while buf[:2] == b"\r\n":
            del buf[:2]
            self._scanned = 0
        end = buf.find(b"\r\n\r\n", self._scanned)
        if end < 0:
            self._check_partial(buf, self._scanned)
            self._scanned = max(0, len(buf) - 3)
            return NEED_DATA
        block = bytes(buf[:end])
        del buf[:end + 4]
        self._scanned = 0
        head = parse_head(block, self)
        self._start_body(head)
        return head

    def _check_partial(self, buf, start):
        # An incomplete head may end in the first byte of a CRLF (line) or in
        # a CRLF and the first CR of the final CRLF CRLF (fields): not over
        # the limit yet.  Only bytes new since ``start`` are searched, so a
        # client sending one byte per segment costs linear, not quadratic, time.
        first = buf.find(b"\r\n")
        line = len(buf) - 1 if first < 0 else first
        if line > self.max_line:
            raise ProtocolError(414, "Request line too long.")
        if first >= 0 and len(buf) - first - 5 > self.max_header:
            raise ProtocolError(431, "Request header fields too large.")
        if buf.find(b"\n\n", start) >= 0 or buf.find(b"\r\r", start) >= 0:
            raise ProtocolError(400, "Bare CR or LF in the request head.")

    def _start_body(self, head):
        self._total = 0
        if head.chunked:
            self._state = self._chunk_size
        elif head.content_length:
            if self.max_body and head.content_length > self.max_body:
                raise ProtocolError(413, "Request body too large.")
            self._remaining = head.content_length
            self._state = self._fixed_body
        else:
            self._state = self._end

    # -- bodies ------------------------------------------------------------
    def _end(self, max_bytes):
        self._state = self._head
        return END_OF_MESSAGE

    def _take(self, max_bytes, then):
        """Up to ``max_bytes`` of the ``_remaining`` body bytes already buffered."""
        if not self.buffer:
            return NEED_DATA
        n = min(len(self.buffer), self._remaining, max_bytes)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        self._remaining -= n
        if not self._remaining:
            self._state = then
        return data

    def _fixed_body(self, max_bytes):
        return self._take(max_bytes, self._end)

    def _chunk_size(self, max_bytes):
        # chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
        buf = self.buffer
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > 18 + self.max_ext:
                raise ProtocolError(400, "Chunk size line too long.")
            return NEED_DATA
        line = bytes(buf[:end])
        del buf[:end + 2]
        size, _, ext = line.partition(b";")
        if not _HEXDIGITS.fullmatch(size):
            raise ProtocolError(400, "Invalid chunk size.")
        if len(ext) > self.max_ext or _BAD_VALUE.search(ext):
            raise ProtocolError(400, "Invalid or oversized chunk extension.")
        self._remaining = int(size, 16)
        self._total += self._remaining
        if self.max_body and self._total > self.max_body:
            raise ProtocolError(413, "Request body too large.")
        self._state = self._chunk_data if self._remaining else self._trailer
        return _AGAIN

    def _chunk_data(self, max_bytes):
        return self._take(max_bytes, self._chunk_crlf)

    def _chunk_crlf(self, max_bytes):
        if len(self.buffer) < 2:
            return NEED_DATA
        if self.buffer[:2] != b"\r\n":
            raise ProtocolError(400, "Chunk data not followed by CRLF.")
        del self.buffer[:2]
        self._state = self._chunk_size
        return _AGAIN

    def _trailer(self, max_bytes):
        # trailer-section = *( field-line CRLF ) CRLF: read, checked, discarded.
        buf = self.buffer
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > self.max_header:
                    raise ProtocolError(431, "Trailer section too large.")
                return NEED_DATA
            line = bytes(buf[:end])
            del buf[:end + 2]
            if not line:
                self._state = self._head
                return END_OF_MESSAGE
            self._remaining += len(line) + 2  # counts trailer bytes from here on
            if self._remaining > self.max_header:
                raise ProtocolError(431, "Trailer section too large.")
            _field(line)


def _field(line: bytes):
    """One field-line -> (name, value) as latin-1 str; ProtocolError if malformed."""
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 5.2: "A server that receives an obs-fold in a request
            # message ... MUST either reject the message by sending a 400".
            raise ProtocolError(400, "Obsolete line folding is not accepted.")
        raise ProtocolError(400, "Invalid header field name.")
    if b"_" in name:
        # WSGI maps '-' and '_' to the same HTTP_ key, so X_Forwarded_For
        # could pose as X-Forwarded-For behind a proxy.  Refuse, don't drop.
        raise ProtocolError(400, "Underscores are not accepted in header names.")
    value = value.strip(b" \t")
    if _BAD_VALUE.search(value):
        raise ProtocolError(400, "Control character in a header value.")
    return name.decode("ascii"), value.decode("latin-1")


def parse_head(block: bytes, parser: RequestParser) -> RequestHead:
    """Parse a request head (without its final CRLF CRLF) under ``parser``'s limits."""
    line, _, fields = block.partition(b"\r\n")
    if len(line) > parser.max_line:
        raise ProtocolError(414, "Request line too long.")
    if len(fields) > parser.max_header:
        raise ProtocolError(431, "Request header fields too large.")
    if block.count(b"\n") != block.count(b"\r\n") or block.count(b"\r") != block.count(b"\n"):
        # RFC 9112 2.2: "A sender MUST NOT generate a bare CR ... a recipient
        # of such a bare CR MUST consider that element to be invalid".
        raise ProtocolError(400, "Bare CR or LF in the request head.")
    head = _request_line(line)
    lines = fields.split(b"\r\n") if fields else ()
    if len(lines) > parser.max_fields:
        raise ProtocolError(431, "Too many header fields.")
    head.headers = [_field(field) for field in lines]
    _semantics(head)
    return head


def _request_line(line: bytes) -> RequestHead:
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        if re.fullmatch(rb"\S+ \S+ HTTP/[0-9]+\.[0-9]+", line):
            raise ProtocolError(505, "HTTP version not supported.")
        raise ProtocolError(400, "Malformed request line.")
    method, target, major, minor = match.groups()
    if (major, minor) not in ((b"1", b"1"), (b"1", b"0")):
        raise ProtocolError(505, "HTTP version not supported.")
    head = RequestHead(method.decode("ascii"), target.decode("ascii"),
                       "HTTP/1." + minor.decode("ascii"), [])
    _target(head)
    return head


def _target(head):
    target = head.target
    if target[0] == "/":  # origin-form
        head.path, _, head.query = target.partition("?")
    elif target == "*" and head.method == "OPTIONS":  # asterisk-form
        head.path = "*"
    elif head.method == "CONNECT":
        raise ProtocolError(501, "CONNECT is not supported.")
    else:  # absolute-form; RFC 9112 3.2.2: its authority wins over Host
        match = _ABSOLUTE.fullmatch(target)
        if match is None or match.group(1).lower() not in ("http", "https"):
            raise ProtocolError(400, "Invalid request target.")
        head.scheme, head.host = match.group(1).lower(), match.group(2)
        rest = match.group(3) or "/"
        if rest[0] != "/":
            rest = "/" + rest
        head.path, _, head.query = rest.partition("?")
    if "#" in target:
        raise ProtocolError(400, "A fragment is not allowed in a request target.")


def _semantics(head):
    """Host, framing (Content-Length / Transfer-Encoding), Connection, Expect."""
    hosts, lengths, codings = [], [], []
    for name, value in head.headers:
        lname = name.lower()
        if lname == "host":
            hosts.append(value)
        elif lname == "content-length":
            lengths.append(value)
        elif lname == "transfer-encoding":
            codings.extend(c.strip(" \t").lower() for c in value.split(","))
        elif lname == "connection":
            tokens = {t.strip(" \t").lower() for t in value.split(",")}
            if "close" in tokens:
                head.keep_alive = False
            elif "keep-alive" in tokens:
                head.keep_alive = True
        elif lname == "expect":
            if value.lower() != "100-continue":
                raise ProtocolError(417, "Only 'Expect: 100-continue' is supported.")
            head.expect_continue = head.version == "HTTP/1.1"
    _host(head, hosts)
    if codings:
        _transfer_coding(head, codings, lengths)
    elif lengths:
        _content_length(head, lengths)


def _host(head, hosts):
    # RFC 9112 3.2: "A server MUST respond with a 400 (Bad Request) status code
    # to any HTTP/1.1 request message that lacks a Host header field and to any
    # request message that contains more than one Host header field line or a
    # Host header field with an invalid field value."
    if len(hosts) > 1 or (not hosts and head.version == "HTTP/1.1"):
        raise ProtocolError(400, "Exactly one Host header is required.")
    if hosts and not _HOST.fullmatch(hosts[0]):
        raise ProtocolError(400, "Invalid Host header.")
    if head.host is None and hosts:
        head.host = hosts[0]


def _transfer_coding(head, codings, lengths):
    if head.version == "HTTP/1.0":
        raise ProtocolError(400, "Transfer-Encoding is not allowed in HTTP/1.0.")
    if lengths:
        # RFC 9112 6.1: a message with both "ought to be handled as an error";
        # both together are the classic request-smuggling vector.
        raise ProtocolError(400, "Both Content-Length and Transfer-Encoding.")
    if not all(_TOKEN.fullmatch(c.encode("latin-1")) for c in codings):
        raise ProtocolError(400, "Invalid Transfer-Encoding.")
    if codings.count("chunked") > 1:
        raise ProtocolError(400, "chunked applied more than once.")
    if codings != ["chunked"]:
        raise ProtocolError(501, "Only the chunked transfer coding is supported.")
    head.chunked = True


def _content_length(head, lengths):
    if any(not _DIGITS.fullmatch(v.encode("latin-1")) for v in lengths):
        raise ProtocolError(400, "Invalid Content-Length.")
    if len(set(int(v) for v in lengths)) > 1:
        raise ProtocolError(400, "Conflicting Content-Length values.")
    head.content_length = int(lengths[0])


# ===========================================================================
# WSGI bridge (PEP 3333)
# Contract: an _Exchange turns one RequestHead into a WSGI environ, calls the
# application and checks what it answers: a status or header field carrying
# CR, LF or NUL, or a hop-by-hop field, raises in start_response (the client
# gets a 500), never silently stripped.  It frames the response
# (Content-Length when known, else chunked on HTTP/1.1, else close) and sends
# small responses in one write.  It reaches the socket only through the
# Server's recv/send/sendfile methods.
# ===========================================================================

_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade"))
_STATUS = re.compile(r"[1-5][0-9][0-9] [\t\x20-\x7e\x80-\xff]*")
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_ENV_KEYS = {"Content-Type": "CONTENT_TYPE", "Content-Length": "CONTENT_LENGTH"}
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache = [0, ""]
_reasons = {}


def http_date(when: float = None) -> str:
    """RFC 9110 IMF-fixdate, independent of the locale."""
    t = time.gmtime(when)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _WEEKDAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def _now_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = now, http_date(now)
    return _date_cache[1]


def status_line(code: int) -> str:
    """'404 Not Found' for 404."""
    line = _reasons.get(code)
    if line is None:
        from http import HTTPStatus
        try:
            line = "%d %s" % (code, HTTPStatus(code).phrase)
        except ValueError:
            line = "%d Unknown" % code
        _reasons[code] = line
    return line


def error_page(status: int, message: str = None, detail: str = None) -> bytes:
    """A small HTML page; everything reflected in it is escaped."""
    from html import escape
    title = escape(status_line(status))
    text = "<p>%s</p>" % escape(message) if message else ""
    pre = "<pre>%s</pre>" % escape(detail) if detail else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>%s</title></head>"
            "<body><h1>%s</h1>%s%s</body></html>\n" % (title, title, text, pre)).encode("utf-8")


_ERROR_HEADERS = [("Content-Type", "text/html; charset=utf-8"), ("X-Content-Type-Options", "nosniff")]


def _simple_response(status: int, message: str = None) -> bytes:
    """A complete error response that closes the connection."""
    body = error_page(status, message)
    return ("HTTP/1.1 %s\r\nContent-Type: text/html; charset=utf-8\r\n"
            "X-Content-Type-Options: nosniff\r\nContent-Length: %d\r\nDate: %s\r\n"
            "Connection: close\r\n\r\n" % (status_line(status), len(body), _now_date())
            ).encode("latin-1") + body


def _unquote(path: str) -> str:
    from urllib.parse import unquote_to_bytes
    return unquote_to_bytes(path).decode("latin-1")


def _env_key(name: str) -> str:
    key = _ENV_KEYS.get(name)
    if key is None:
        key = "HTTP_" + name.upper().replace("-", "_")
        if len(_ENV_KEYS) < 1000:  # bounded: header names come from clients
            _ENV_KEYS[name] = key
    return key


class FileWrapper:
    """wsgi.file_wrapper: the server sends such a body with sendfile()."""

    def __init__(self, filelike, blksize: int = 64 * KiB, offset: int = 0, length: int = None):
        self.filelike, self.blksize, self.offset, self.length = filelike, blksize, offset, length
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        self.filelike.seek(self.offset) if self.offset else None
        left = self.length
        while left is None or left > 0:
            block = self.filelike.read(self.blksize if left is None else min(left, self.blksize))
            if not block:
                return
            if left is not None:
                left -= len(block)
            yield block


class _Input:
    """wsgi.input: the request body, pulled from the socket only on demand."""

    def __init__(self, exchange):
        self.ex = exchange
        self.pending = b""
        self.received = 0
        self.started = None
        self.continue_sent = False

    def _next(self, max_bytes: int) -> bytes:
        ex, parser = self.ex, self.ex.conn.parser
        if not parser.in_body:
            return b""
        if ex.head.expect_continue and not self.continue_sent and not ex.headers_sent:
            self.continue_sent = True
            ex.server.send(ex.conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            event = parser.next_event(max_bytes)
            if event is END_OF_MESSAGE:
                return b""
            if event is not NEED_DATA:
                self.received += len(event)
                return event
            ex.server.recv(ex.conn, self._timeout())

    def _timeout(self) -> float:
        """Per-receive wait: socket_timeout, shortened to keep min_body_rate."""
        config = self.ex.server.config
        grace, rate = config["server.socket_timeout"], config["server.min_body_rate"]
        now = time.monotonic()
        if self.started is None:
            self.started = now
        if not rate:
            return grace
        left = self.started + grace + self.received / rate - now
        if left <= 0:
            raise _Timeout()
        return min(grace, left)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = sys.maxsize
        parts, have = [], 0
        if self.pending:
            parts.append(self.pending[:size])
            have, self.pending = len(parts[0]), self.pending[size:]
        while have < size:
            chunk = self._next(min(size - have, _RECV))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def readline(self, size: int = -1) -> bytes:
        pending = self.pending
        while True:
            nl = pending.find(b"\n")
            if nl >= 0 or 0 <= size <= len(pending):
                break
            chunk = self._next(_RECV)
            if not chunk:
                break
            pending += chunk
        cut = len(pending) if nl < 0 else nl + 1
        if 0 <= size < cut:
            cut = size
        line, self.pending = pending[:cut], pending[cut:]
        return line

    def readlines(self, hint: int = -1) -> list:
        lines, total = [], 0
        for line in self:
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def drain(self, limit: int) -> bool:
        """Discard up to ``limit`` unread body bytes; True if the body ended."""
        self.pending = b""
        while limit > 0:
            chunk = self._next(min(limit, _RECV))
            if not chunk:
                return not self.ex.conn.parser.in_body
            limit -= len(chunk)
        return self._next(1) == b"" and not self.ex.conn.parser.in_body


class _Exchange:
    """One request and its response on a connection."""

    def __init__(self, server, conn):
        self.server, self.conn, self.head = server, conn, conn.head
        self.status = self.headers = self.length = None
        self.headers_sent = self.chunked = False
        self.no_body = self.head.method == "HEAD"
        self.sent = 0
        self.close = not self.head.keep_alive
        self.input = _Input(self)

    def run(self) -> bool:
        """Serve the request; True if the connection may carry another."""
        environ = self.environ()
        try:
            self.respond(environ)
            if self.conn.parser.error is not None:
                return False  # the app swallowed a framing error: never read on
            self.finish_body()
        except _ClientGone:
            return False
        except _Timeout:
            self.fail(408, "The request body arrived too slowly.")
        except ProtocolError as err:
            self.fail(err.status, err.message)
        if self.server._access:
            self.log(environ)
        return not self.close

    def respond(self, environ):
        try:
            result = self.server.app(environ, self.start_response)
            try:
                self.send_result(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
        except (_ClientGone, _Timeout, ProtocolError):
            raise
        except Exception:
            _logger().exception("Error answering %s %s", self.head.method, self.head.target)
            self.fail(500, None)

    def fail(self, status: int, message: str):
        """Answer with an error if nothing was sent yet; close either way."""
        self.close = True
        if not self.headers_sent:
            self.headers_sent = True
            self.status = status_line(status)
            self.server.send(self.conn, _simple_response(status, message))

    def environ(self) -> dict:
        head, conn, server = self.head, self.conn, self.server
        env = {
            "REQUEST_METHOD": head.method, "SCRIPT_NAME": "",
            "PATH_INFO": _unquote(head.path) if "%" in head.path else head.path,
            "QUERY_STRING": head.query, "SERVER_PROTOCOL": head.version,
            "REQUEST_URI": head.target, "RAW_URI": head.target,
            "REMOTE_ADDR": conn.addr[0] if conn.addr else "", "REMOTE_PORT": str(conn.addr[1]) if conn.addr else "",
            "SERVER_NAME": server.host, "SERVER_PORT": str(server.port),
            "wsgi.version": (1, 0), "wsgi.url_scheme": "https" if conn.tls else "http",
            "wsgi.input": self.input, "wsgi.errors": sys.stderr, "wsgi.multithread": True,
            "wsgi.multiprocess": False, "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper, "wsgi.input_terminated": True,
        }
        for name, value in head.headers:
            key = _ENV_KEYS.get(name) or _env_key(name)
            if key in env:
                env[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
            else:
                env[key] = value
        if head.host is not None:
            env["HTTP_HOST"] = head.host  # absolute-form authority wins over Host
        return env

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        if not isinstance(status, str) or not _STATUS.fullmatch(status):
            raise ValueError("invalid status line %r" % (status,))
        self.length = _check_headers(headers)
        self.status, self.headers = status, headers
        return self.write

    def send_result(self, result):
        if isinstance(result, (list, tuple)) and all(type(b) is bytes for b in result):
            body = result[0] if len(result) == 1 else b"".join(result)
            if not self.headers_sent and self.length is None:
                self.length = len(body)
                self.headers = self.headers + [("Content-Length", str(self.length))]
            self.write(body)
        elif isinstance(result, FileWrapper) and self.length is not None and not self.headers_sent:
            self.send_head(b"")
            if not self.no_body and self.length:
                offset = result.offset or result.filelike.tell()
                self.server.sendfile(self.conn, result.filelike, offset, self.length)
                self.sent = self.length
        else:
            for chunk in result:
                self.write(chunk)
        self.write_end()

    def write(self, data: bytes):
        if type(data) is not bytes:
            raise TypeError("WSGI body chunks must be bytes, not %s" % type(data).__name__)
        if not self.headers_sent:
            if data or self.length == 0:
                self.send_head(data)
        elif data:
            self.server.send(self.conn, self.frame(data))

    def frame(self, data: bytes) -> bytes:
        if self.no_body:
            return b""
        if self.length is not None and self.sent + len(data) > self.length:
            _logger().error("%s sent more than its Content-Length; truncated", self.head.target)
            data, self.close = data[:self.length - self.sent], True
        self.sent += len(data)
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def write_end(self):
        if not self.headers_sent:
            if self.length is None:
                self.length = 0
                self.headers = self.headers + [("Content-Length", "0")]
            self.send_head(b"")
        elif self.chunked:
            self.server.send(self.conn, b"0\r\n\r\n")
        if self.length is not None and self.sent < self.length and not self.no_body:
            self.close = True  # the body is shorter than announced: the client must notice

    def send_head(self, first: bytes):
        if self.status is None:
            raise AssertionError("write() before start_response()")
        code = int(self.status[:3])
        if code in (204, 304) or code < 200:
            self.no_body = True
        lines = ["HTTP/1.1 ", self.status, "\r\n"]
        for name, value in self.headers:
            lines += (name, ": ", value, "\r\n")
        if self.length is None and not self.no_body:
            if self.head.version == "HTTP/1.1":
                self.chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self.close = True  # HTTP/1.0 without a length: the close ends the body
        if self.server._stopping or self.conn.parser.error is not None:
            self.close = True  # after a framing error nothing more is read: say so
        if self.close:
            lines.append("Connection: close\r\n")
        elif self.head.version == "HTTP/1.0":
            lines.append("Connection: keep-alive\r\n")
        lines += ("Date: ", _now_date(), "\r\n\r\n")
        self.headers_sent = True
        self.server.send(self.conn, "".join(lines).encode("latin-1") + self.frame(first))

    def finish_body(self):
        """Make the connection ready for the next request, or mark it to close."""
        if not self.conn.parser.in_body:
            return
        if self.head.expect_continue and not self.input.continue_sent:
            self.close = True  # we never asked for the body; don't wait for it
        elif not self.close and not self.input.drain(64 * KiB):
            self.close = True

    def log(self, environ):
        user = environ.get("REMOTE_USER") or "-"
        self.server._access('%s - %s [%s] "%s %s %s" %s %s' % (
            environ["REMOTE_ADDR"] or "-", user, time.strftime("%d/%b/%Y:%H:%M:%S %z"),
            self.head.method, self.head.target, self.head.version,
            (self.status or "000")[:3], self.sent or "-"))


def _check_headers(headers) -> int:
    """Validate response header fields; returns the Content-Length or None."""
    if type(headers) is not list:
        raise TypeError("response headers must be a list of (name, value) tuples")
    length = None
    for item in headers:
        if type(item) is not tuple or len(item) != 2:
            raise TypeError("response header %r is not a (name, value) tuple" % (item,))
        name, value = item
        if type(name) is not str or not _NAME.fullmatch(name):
            raise ValueError("invalid response header name %r" % (name,))
        if type(value) is not str or not _VALUE.fullmatch(value):
            raise ValueError("invalid value for response header %s: %r" % (name, value))
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            raise ValueError("hop-by-hop header %r is the server's business" % (name,))
        if lname == "content-length":
            if not value.isdigit() or not value.isascii():
                raise ValueError("invalid Content-Length %r" % (value,))
            length = int(value)
    return length


# ===========================================================================
# Application and dispatch
# Contract: Application(root, config) is a PEP 3333 callable.  Per request it
# sets the thread-local minipub.request / minipub.response, walks the object
# tree from ``root`` to an exposed handler (CherryPy's default dispatcher),
# runs the hooks tools attached along the way (auth), binds path segments and
# parameters to the handler's signature *before* calling it (a mismatch is a
# 404 for path and query, a 400 for body parameters, so a TypeError raised
# inside a handler stays a 500), and turns its return value into a body.
# HTTPError and HTTPRedirect become their responses; anything else raised is
# logged and answered with a 500 that shows no traceback unless
# request.show_tracebacks is on.
# ===========================================================================

def expose(func):
    """Mark a method (or a whole method-dispatched class) as reachable by URL."""
    func.exposed = True
    return func


_local = threading.local()


class _Proxy:
    """minipub.request / minipub.response: this thread's current object."""

    __slots__ = ("_name",)

    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def _target(self):
        try:
            return getattr(_local, self._name)
        except AttributeError:
            raise RuntimeError("minipub.%s exists only while a request is handled" % self._name) from None

    def __getattr__(self, attr):
        return getattr(self._target(), attr)

    def __setattr__(self, attr, value):
        setattr(self._target(), attr, value)

    def __repr__(self):
        return "<minipub.%s proxy>" % self._name


request = _Proxy("request")
response = _Proxy("response")


class HeaderDict(dict):
    """Case-insensitive header fields; a value with CR, LF or NUL raises ValueError."""

    def __init__(self, items=()):
        super().__init__()
        self.names = {}
        for name, value in (items.items() if isinstance(items, dict) else items):
            self[name] = value

    def __setitem__(self, name, value):
        value = str(value)
        if not _NAME.fullmatch(name):
            raise ValueError("invalid header name %r" % (name,))
        if not _VALUE.fullmatch(value):
            raise ValueError("header %s: value %r has CR, LF, NUL or another control character"
                             % (name, value))
        self.names[name.lower()] = name
        super().__setitem__(name.lower(), value)

    def __getitem__(self, name):
        return super().__getitem__(name.lower())

    def __delitem__(self, name):
        super().__delitem__(name.lower())
        del self.names[name.lower()]

    def __contains__(self, name):
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name, default=None):
        return super().get(name.lower(), default)

    def pop(self, name, *default):
        self.names.pop(name.lower(), None)
        return super().pop(name.lower(), *default)

    def setdefault(self, name, value):
        if name not in self:
            self[name] = value
        return self[name]

    def update(self, other=(), **more):
        for name, value in (other.items() if isinstance(other, dict) else other):
            self[name] = value
        for name, value in more.items():
            self[name] = value

    def fields(self) -> list:
        """[(name as first written, value)] for start_response."""
        return [(self.names[k], v) for k, v in self.items()]


def _request_headers(environ) -> HeaderDict:
    headers = HeaderDict()
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            dict.__setitem__(headers, key[5:].replace("_", "-").lower(), value)
            headers.names[key[5:].replace("_", "-").lower()] = key[5:].replace("_", "-").title()
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            dict.__setitem__(headers, key.replace("_", "-").lower(), value)
            headers.names[key.replace("_", "-").lower()] = key.replace("_", "-").title()
    return headers


class Request:
    """What the client asked: minipub.request while a handler runs."""

    def __init__(self, environ, app):
        self.environ, self.app = environ, app
        self.method = environ["REQUEST_METHOD"]
        self.script_name = environ.get("SCRIPT_NAME", "")
        self.path_info = _utf8(environ.get("PATH_INFO", ""))
        self.path = self.script_name + self.path_info
        self.query_string = environ.get("QUERY_STRING", "")
        self.remote_addr = environ.get("REMOTE_ADDR", "")
        self.scheme = environ.get("wsgi.url_scheme", "http")
        self.host = environ.get("HTTP_HOST") or "%s:%s" % (
            environ.get("SERVER_NAME", "localhost"), environ.get("SERVER_PORT", "80"))
        self.body = environ["wsgi.input"]
        self.params, self.login = {}, None
        self.show_tracebacks = app.config["request.show_tracebacks"]
        _apply_forwarded(self, app.config["server.trusted_proxies"])

    @property
    def base(self) -> str:
        return "%s://%s" % (self.scheme, self.host)

    @property
    def url(self) -> str:
        return self.base + _quote_path(self.path) + ("?" + self.query_string if self.query_string else "")

    @property
    def headers(self) -> HeaderDict:
        headers = self.__dict__.get("_headers")
        if headers is None:
            headers = self.__dict__["_headers"] = _request_headers(self.environ)
        return headers

    @property
    def cookies(self) -> dict:
        cookies = self.__dict__.get("_cookies")
        if cookies is None:
            cookies = self.__dict__["_cookies"] = _parse_cookies(self.environ.get("HTTP_COOKIE", ""))
        return cookies


def _utf8(text: str) -> str:
    """PEP 3333 hands paths over as latin-1; browsers send UTF-8."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _quote_path(path: str) -> str:
    from urllib.parse import quote
    return quote(path, safe="/:@!$&'()*+,;=-._~")


def _parse_cookies(header: str) -> dict:
    cookies = {}
    for pair in header.split(";"):
        name, eq, value = pair.strip(" \t").partition("=")
        if eq and name and name not in cookies:
            if len(value) > 1 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies[name] = value
    return cookies


def _apply_forwarded(req, trusted):
    """Believe Forwarded / X-Forwarded-* only from a trusted proxy (see VirtualHost)."""
    if trusted and _is_trusted(req.remote_addr, trusted):
        env = req.environ
        forwarded_for = env.get("HTTP_X_FORWARDED_FOR")
        if forwarded_for:
            req.remote_addr = forwarded_for.split(",")[-1].strip(" \t")
        proto = env.get("HTTP_X_FORWARDED_PROTO", "").lower()
        if proto in ("http", "https"):
            req.scheme = proto


def _is_trusted(addr: str, trusted) -> bool:
    import ipaddress
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net, strict=False) for net in trusted)


class Response:
    """What the handler answers: minipub.response while a handler runs."""

    def __init__(self):
        self.status = 200
        self._headers = HeaderDict()
        self.cookies = []

    @property
    def headers(self) -> HeaderDict:
        return self._headers

    @headers.setter
    def headers(self, value):
        self._headers = value if isinstance(value, HeaderDict) else HeaderDict(value)

    def set_cookie(self, name: str, value: str, max_age: int = None, path: str = "/",
                   domain: str = None, secure: bool = None, httponly: bool = True,
                   samesite: str = "Lax") -> None:
        """Add a Set-Cookie field; HttpOnly and SameSite=Lax unless told otherwise."""
        if not _NAME.fullmatch(name) or not re.fullmatch(r"[!#-+\--:<-\[\]-~]*", value):
            raise ValueError("cookie %r=%r: name must be a token, value cookie-octets" % (name, value))
        parts = ["%s=%s" % (name, value), "Path=%s" % path]
        if max_age is not None:
            parts.append("Max-Age=%d" % max_age)
        if domain:
            parts.append("Domain=%s" % domain)
        if secure or (secure is None and request.scheme == "https"):
            parts.append("Secure")
        if httponly:
            parts.append("HttpOnly")
        if samesite:
            parts.append("SameSite=%s" % samesite)
        cookie = "; ".join(parts)
        if not _VALUE.fullmatch(cookie):
            raise ValueError("cookie attributes contain control characters")
        self.cookies.append(cookie)

    def delete_cookie(self, name: str, path: str = "/") -> None:
        self.set_cookie(name, "", max_age=0, path=path)


class Application:
    """A PEP 3333 application serving the object tree under ``root``."""

    def __init__(self, root, config: dict = None, script_name: str = ""):
        self.root = root
        self.config = make_config(config)
        self.script_name = script_name.rstrip("/")

    def __call__(self, environ, start_response):
        if self.script_name:
            if not _mount(environ, self.script_name):
                start_response("404 Not Found", list(_ERROR_HEADERS))
                return [error_page(404)]
        req, resp = Request(environ, self), Response()
        _local.request, _local.response = req, resp
        try:
            body = self.respond(req, resp)
        except HTTPRedirect as redirect:
            body = self.redirect(req, resp, redirect)
        except HTTPError as err:
            body = self.error(resp, err.status, err.message, getattr(err, "headers", None))
        except (_ClientGone, _Timeout):
            raise  # the server's business (close, or 408), not a handler bug to log
        except Exception:
            _logger().exception("Error in handler for %s %s", req.method, req.path)
            detail = None
            if req.show_tracebacks:
                import traceback
                detail = traceback.format_exc()
            body = self.error(resp, 500, None, None, detail)
        if req.login is not None:
            environ["REMOTE_USER"] = req.login
        fields = resp.headers.fields() + [("Set-Cookie", c) for c in resp.cookies]
        status = resp.status if isinstance(resp.status, str) else status_line(int(resp.status))
        start_response(status, fields)
        return body

    def respond(self, req, resp):
        root = self.root
        resolve = getattr(root, "_minipub_resolve", None)
        if resolve is not None:  # VirtualHost picks the tree by host
            root = resolve(req)
        handler, args, trail, redirect = find_handler(root, req.path_info)
        if redirect:
            qs = "?" + req.query_string if req.query_string else ""
            raise HTTPRedirect(_quote_path(req.script_name + req.path_info) + "/" + qs, 301)
        if handler is None:
            raise NotFound()
        for node in trail:
            for hook in getattr(node, "_minipub_hooks", ()):
                hook(req)
        handler = _method_handler(handler, req.method)
        for hook in getattr(handler, "_minipub_hooks", ()):
            hook(req)
        query, body = _query_params(req.query_string), _body_params(req)
        req.params = _merge(query, body)
        result = handler(*args, **_bind(handler, args, query, body))
        return _body_of(result, resp)

    def redirect(self, req, resp, redirect):
        location = absolute_url(req, redirect.url)
        resp.status = redirect.status
        resp.headers = HeaderDict([("Location", location)] + _ERROR_HEADERS)
        from html import escape
        return [('<!DOCTYPE html>\n<p>This resource is at <a href="%s">%s</a>.</p>\n'
                 % (escape(location), escape(location))).encode("utf-8")]

    def error(self, resp, status, message, headers=None, detail=None):
        resp.status = status
        resp.headers = HeaderDict(_ERROR_HEADERS + list(headers or ()))
        resp.cookies = []
        return [error_page(status, message, detail)]


def _mount(environ, script_name) -> bool:
    path = environ.get("PATH_INFO", "")
    if path != script_name and not path.startswith(script_name + "/"):
        return False
    environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + script_name
    environ["PATH_INFO"] = path[len(script_name):]
    return True


def absolute_url(req, url: str) -> str:
    """``url`` resolved against the request; '//host' and '/\\host' count as external."""
    from urllib.parse import urljoin
    if url[:2].replace("\\", "/") == "//":
        # Browsers read '/\host' as '//host'; treat both as the other host they
        # name, so what the server checks is what the browser follows.
        return "%s://%s" % (req.scheme, url.replace("\\", "/").lstrip("/"))
    return urljoin(req.base + _quote_path(req.path), url)


_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_TO_NAME = str.maketrans(_PUNCTUATION, "_" * len(_PUNCTUATION))


def _exposed(obj) -> bool:
    return getattr(obj, "exposed", False) is True


def find_handler(root, path: str):
    """Walk ``path`` from ``root``: (handler, positional args, nodes walked, redirect?)."""
    segments = [s for s in path.split("/")]
    segments = segments[1:] if segments and segments[0] == "" else segments
    trailing = bool(segments) and segments[-1] == ""
    if trailing:
        segments.pop()
    trail = [root]
    for segment in segments:
        name = segment.translate(_TO_NAME)
        if not name or name[0] == "_":
            break  # private attributes are never reachable
        child = getattr(trail[-1], name, None)
        if child is None:
            break
        trail.append(child)
    for depth in range(len(trail) - 1, -1, -1):
        node, rest = trail[depth], segments[depth:]
        found = _candidate(node, rest, depth, trailing)
        if found is not None:
            handler, args, redirect = found
            return handler, args, trail[:depth + 1], redirect
    return None, [], trail, False


def _candidate(node, rest, depth, trailing):
    if not rest:
        if _exposed(node) and callable(node):
            return node, [], False
        index = getattr(node, "index", None)
        if _exposed(index):
            return index, [], depth > 0 and not trailing
        if _exposed(node):  # a method-dispatched resource
            return node, [], False
    elif _exposed(node):  # a handler, or a resource, taking the rest as arguments
        return node, list(rest), False
    default = getattr(node, "default", None)
    if _exposed(default):
        return default, list(rest), False
    return None


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _method_handler(handler, method):
    """A resource exposed as a class answers through its GET, POST, ... methods."""
    if callable(handler):
        return handler
    found = getattr(handler, method, None)
    if found is None and method == "HEAD":
        found = getattr(handler, "GET", None)
    if found is None:
        allowed = [m for m in _METHODS if hasattr(handler, m)]
        if "GET" in allowed and "HEAD" not in allowed:
            allowed.insert(1, "HEAD")
        err = HTTPError(405, "%s is not allowed here." % method)
        err.headers = [("Allow", ", ".join(allowed))]
        raise err
    return found


_specs = {}


def _spec(handler):
    """(positional names, required names, keyword names, *args?, **kwargs?) of a handler."""
    func = getattr(handler, "__func__", handler)
    spec = _specs.get(func)
    if spec is not None:
        return spec
    code = getattr(func, "__code__", None)
    if code is None or hasattr(func, "__wrapped__"):
        spec = _spec_from_signature(handler)
    else:
        names = code.co_varnames[:code.co_argcount]
        if hasattr(handler, "__self__"):
            names = names[1:]
        required = names[:len(names) - len(func.__defaults__ or ())]
        kwonly = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
        required += tuple(k for k in kwonly if k not in (func.__kwdefaults__ or {}))
        spec = (names, required, frozenset(names + kwonly), bool(code.co_flags & 4),
                bool(code.co_flags & 8))
    if len(_specs) < 10000:
        _specs[func] = spec
    return spec


def _spec_from_signature(handler):
    import inspect
    params = inspect.signature(handler).parameters.values()
    kinds = inspect.Parameter
    positional = tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD))
    keyword = tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY))
    required = tuple(p.name for p in params if p.default is kinds.empty
                     and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD))
    return (positional, required, frozenset(keyword),
            any(p.kind == kinds.VAR_POSITIONAL for p in params),
            any(p.kind == kinds.VAR_KEYWORD for p in params))


def _bind(handler, args, query, body) -> dict:
    """The keyword arguments for ``handler``; NotFound or 400 if they do not fit."""
    positional, required, names, varargs, varkw = _spec(handler)
    if len(args) > len(positional) and not varargs:
        raise NotFound()
    taken = positional[:len(args)]
    params = _merge(query, body) if body else query
    for name in params:
        if name in taken or (name not in names and not varkw):
            raise NotFound() if name in query else HTTPError(400, "Unexpected parameter %r." % name)
    missing = [n for n in required if n not in taken and n not in params]
    if missing:
        raise NotFound()
    return params


def _merge(query: dict, body: dict) -> dict:
    if not body:
        return query
    merged = dict(query)
    for name, value in body.items():
        if name in merged:
            old = merged[name] if isinstance(merged[name], list) else [merged[name]]
            merged[name] = old + (value if isinstance(value, list) else [value])
        else:
            merged[name] = value
    return merged


def _pairs_to_dict(pairs) -> dict:
    params = {}
    for name, value in pairs:
        if name in params:
            if not isinstance(params[name], list):
                params[name] = [params[name]]
            params[name].append(value)
        else:
            params[name] = value
    return params


def _query_params(query: str) -> dict:
    if not query:
        return {}
    from urllib.parse import parse_qsl
    try:
        return _pairs_to_dict(parse_qsl(query, keep_blank_values=True, max_num_fields=1000))
    except ValueError:
        raise HTTPError(400, "Too many query parameters.") from None


def _body_params(req) -> dict:
    ctype = req.environ.get("CONTENT_TYPE", "")
    kind = ctype.partition(";")[0].strip(" \t").lower()
    if kind == "application/x-www-form-urlencoded":
        from urllib.parse import parse_qsl
        data = req.body.read().decode("utf-8", "replace")
        try:
            return _pairs_to_dict(parse_qsl(data, keep_blank_values=True, max_num_fields=1000))
        except ValueError:
            raise HTTPError(413, "Too many form fields.") from None
    if kind == "multipart/form-data":
        return parse_multipart(req, ctype)
    return {}


def _body_of(result, resp):
    """A handler's return value as a WSGI body, with a Content-Type by default."""
    if result is None:
        return []
    if isinstance(result, str):
        resp.headers.setdefault("Content-Type", "text/html; charset=utf-8")
        return [result.encode("utf-8")]
    if isinstance(result, bytes):
        resp.headers.setdefault("Content-Type", "application/octet-stream")
        return [result]
    if isinstance(result, (dict, list)):
        import json
        resp.headers.setdefault("Content-Type", "application/json")
        return [json.dumps(result).encode("utf-8")]
    if hasattr(result, "read"):
        resp.headers.setdefault("Content-Type", "application/octet-stream")
        try:
            resp.headers.setdefault("Content-Length", os.fstat(result.fileno()).st_size - result.tell())
        except (AttributeError, OSError, ValueError):
            pass  # not a real file: streamed with chunked framing
        return FileWrapper(result)
    resp.headers.setdefault("Content-Type", "text/html; charset=utf-8")
    return (chunk.encode("utf-8") if isinstance(chunk, str) else chunk for chunk in result)


# -- virtual hosts --------------------------------------------------------------


# ===========================================================================
# Tools: authentication, static files, uploads
# Contract: tools attach hooks to handlers or classes (``_minipub_hooks``),
# which the dispatcher runs before the handler; they raise HTTPError to
# refuse.  They use only the public request/response objects.
# ===========================================================================

def _add_hook(target, hook):
    """Attach ``hook(request)`` to a class or function; returns ``target``."""
    target._minipub_hooks = tuple(getattr(target, "_minipub_hooks", ())) + (hook,)
    return target


# -- authentication (RFC 7617 Basic, RFC 7616 Digest) -----------------------


# -- static files -------------------------------------------------------------


# -- uploads (multipart/form-data, streamed) ----------------------------------

def parse_multipart(req, content_type: str) -> dict:
    """Parse a multipart/form-data body into fields and Part objects."""
    raise HTTPError(415, "multipart/form-data is not supported yet.")


# ===========================================================================
# Reloader
# Contract: with engine.autoreload.on a supervising parent owns the listening
# socket and runs each generation of the application in a child process.
# ===========================================================================


# ===========================================================================
# Command line, logging and quickstart
# Contract: ``python minipub.py MODULE:ATTR`` imports the target from the
# current directory and serves it; bad input gets one line on stderr and
# exit status 2.  Options come from LIMITS.
# ===========================================================================

def configure_logging(config: dict) -> None:
    """Error and access logs from the log.* keys (loggers minipub.error, minipub.access)."""
    import logging
    formats = {"error": "[%(asctime)s] %(levelname)s %(message)s", "access": "%(message)s"}
    for name, file_key in (("error", "log.error_file"), ("access", "log.access_file")):
        logger = logging.getLogger("minipub." + name)
        for handler in [h for h in logger.handlers if getattr(h, "_minipub", False)]:
            logger.removeHandler(handler)
            handler.close()
        handlers = [logging.StreamHandler(sys.stderr)] if config["log.screen"] else []
        if config[file_key]:
            handlers.append(logging.FileHandler(config[file_key], encoding="utf-8"))
        for handler in handlers:
            handler._minipub = True
            handler.setFormatter(logging.Formatter(formats[name]))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def quickstart(root, script_name: str = "", config: dict = None) -> None:
    """Serve ``root`` with minipub's server until Ctrl-C or SIGTERM."""
    config = make_config(config)
    configure_logging(config)
    serve(Application(root, config, script_name), config)


def serve(app, config: dict, sock=None) -> None:
    server = Server(app, config["server.socket_host"], config["server.socket_port"],
                    sock=sock, config=config)
    server._prepare()
    for url in server.urls:
        _logger().info("minipub %s serving on %s", __version__, url)
    server.serve_forever()
    _logger().info("minipub stopped")


class _TargetError(Exception):
    """The MODULE:ATTR given on the command line cannot be served."""


def load_target(spec: str, config: dict):
    """Import MODULE:ATTR from the current directory; a WSGI callable to serve."""
    import importlib
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise _TargetError("target %r is not MODULE:ATTR (e.g. app:Root)" % spec)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # any failure at import: one clear line, not a traceback wall
        raise _TargetError("cannot import %s: %s" % (module_name, _where(exc))) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _TargetError("%s has no attribute %r" % (module_name, attr)) from None
    if isinstance(obj, type):
        obj = obj()
    if isinstance(obj, Application) or (callable(obj) and not hasattr(obj, "index")
                                        and not hasattr(obj, "default") and not _exposed(obj)):
        return obj
    return Application(obj, config)


def _where(exc: BaseException) -> str:
    """'ZeroDivisionError: division by zero (app.py, line 3)'."""
    text = "%s: %s" % (type(exc).__name__, exc)
    if isinstance(exc, SyntaxError):
        return "%s: %s (%s, line %s)" % (type(exc).__name__, exc.msg, exc.filename, exc.lineno)
    import traceback
    frames = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in frames if "importlib" not in f.filename] or frames
    if frames:
        text += " (%s, line %s)" % (frames[-1].filename, frames[-1].lineno)
    return text


def _cli_value(key: str, text: str):
    want = _UNIT_TYPES[_ROWS[key][2]]
    if want is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError("--%s wants true or false, not %r" % (key, text))
        return text.lower() in ("1", "true", "yes", "on")
    if want is tuple:
        return tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        return want(text)
    except ValueError:
        raise ConfigError("--%s wants a %s, not %r" % (key, _ROWS[key][2], text)) from None


def _arg_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog="python %s" % os.path.basename(__file__),
        description="Serve MODULE:ATTR (a class, an instance or a WSGI callable) over HTTP/1.1.")
    parser.add_argument("target", help="what to serve, e.g. app:Root (imported from the current directory)")
    parser.add_argument("--host", help="alias of --server.socket_host")
    parser.add_argument("--port", type=int, help="alias of --server.socket_port")
    parser.add_argument("--threads", type=int, help="alias of --server.thread_pool")
    parser.add_argument("--config", help="INI file with a [global] section of Python literals")
    parser.add_argument("--reload", action="store_true", help="alias of --engine.autoreload.on true")
    parser.add_argument("--certfile", help="alias of --server.ssl_certificate")
    parser.add_argument("--keyfile", help="alias of --server.ssl_private_key")
    table = parser.add_argument_group("settings (the LIMITS table: key, default, why)")
    for key, default, unit, why in LIMITS:
        table.add_argument("--" + key, metavar=unit.upper(), dest=key,
                           help="%s [default: %r]" % (why, default))
    return parser


def _cli_config(args) -> dict:
    values = load_config(args.config) if args.config else make_config()
    aliases = {"host": "server.socket_host", "port": "server.socket_port",
               "threads": "server.thread_pool", "certfile": "server.ssl_certificate",
               "keyfile": "server.ssl_private_key"}
    for alias, key in aliases.items():
        if getattr(args, alias) is not None:
            values[key] = _convert(key, getattr(args, alias))
    for key in _ROWS:
        text = getattr(args, key, None)
        if text is not None:
            values[key] = _convert(key, _cli_value(key, text))
    if args.reload:
        values["engine.autoreload.on"] = True
    return values


def main(argv=None) -> int:
    """The command line; returns the exit status."""
    args = _arg_parser().parse_args(argv)
    try:
        config = _cli_config(args)
        configure_logging(config)
        app = load_target(args.target, config)
        sock = bind_socket(config["server.socket_host"], config["server.socket_port"])
    except (ConfigError, _TargetError) as exc:
        print("minipub: error: %s" % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print("minipub: error: cannot listen on %s port %s: %s" % (
            config["server.socket_host"], config["server.socket_port"],
            exc.strerror or exc), file=sys.stderr)
        return 2
    serve(app, config, sock)
    return 0


if __name__ == "__main__":
    # Run as a script this module is "__main__"; register it under its file
    # name too, so the application's ``import minipub`` gets this very module
    # (one ``request`` object), whatever name the vendored copy has.
    sys.modules.setdefault(os.path.splitext(os.path.basename(__file__))[0], sys.modules[__name__])
    sys.exit(main())
