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
tools (auth, static files, uploads), the test client, the reloader, and the command line.
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

import io  # loaded by the interpreter at startup: importing it here costs nothing
import os
import select
import selectors
import socket
import sys
import time
import _thread  # built in: the locks and thread-local of what runs at import
from collections import deque
import functools  # loaded by socket (its enum) anyway
from functools import cached_property, partialmethod

__version__ = "0.1.0"
__all__ = [
    "expose", "request", "response", "Application", "Server", "quickstart", "HTTPError", "HTTPRedirect",
    "NotFound", "ProtocolError", "ConfigError", "RequestParser", "RequestHead", "LIMITS", "make_config",
    "load_config", "main", "VirtualHost", "bind_socket", "make_ssl_context", "auth_basic", "auth_digest",
    "StaticDir", "serve_file", "Part", "Request", "Response", "HeaderDict", "FileWrapper", "NEED_DATA",
    "END_OF_MESSAGE", "TestClient", "session", "Session", "csrf_token", "MemoryStore", "FileStore",
    "SqliteStore", "CookieStore",
]

# Heavy modules (ssl, json, inspect, logging, email, tempfile, urllib.parse,
# argparse, configparser) are imported inside the functions that need them,
# so ``import minipub`` stays cheap and an idle server stays small.


def _logger(name: str = "error"):
    import logging
    return logging.getLogger("minipub." + name)


class _Module:
    """A module imported at its first use, then the module itself: re and threading are 2-3 ms
    and a tenth of the instructions of ``import minipub`` (what runs at import uses _thread)."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        module = __import__(self.name)
        globals()[self.name] = module  # from now on the module itself
        return getattr(module, attr)


re, threading = _Module("re"), _Module("threading")


class _Lazy:
    """A regular expression compiled at its first use, so importing minipub stays cheap."""

    def __init__(self, pattern, flags=0):
        self.pattern, self.flags = pattern, flags

    def __getattr__(self, name):  # reached only until the first use binds the methods
        compiled = re.compile(self.pattern, self.flags)
        for method in ("fullmatch", "match", "search", "sub", "split", "findall"):
            setattr(self, method, getattr(compiled, method))
        return getattr(compiled, name)


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
    ("server.thread_pool", 10, "threads", "workers that run the application; waiting clients never hold one"),
    ("server.socket_timeout", 10.0, "seconds",
     "longest single wait for a client to send or receive inside a request"),
    ("server.head_timeout", 20.0, "seconds",
     "deadline for a whole request head (408): dribbling one byte a second cannot keep it open"),
    ("server.keepalive_timeout", 5.0, "seconds", "an idle keep-alive connection is closed after this"),
    ("server.max_request_line_size", 8 * KiB, "bytes", "longer request line: 414"),
    ("server.max_request_header_size", 64 * KiB, "bytes", "larger header section: 431"),
    ("server.max_header_count", 100, "fields", "more header fields: 431"),
    ("server.max_request_body_size", 1 * GiB, "bytes", "larger body: 413; 0 means unlimited"),
    ("server.body_buffer_size", 1 * MiB, "bytes",
     "request bodies are read whole by the poll role before a worker sees them: this much in memory, "
     "the rest in a temporary file"),
    ("server.max_body_memory", 256 * MiB, "bytes",
     "request bodies held in memory, all connections together; past it they go to temporary files"),
    ("server.max_unsent_bytes", 512 * MiB, "bytes",
     "response bytes queued for slow readers, all connections together (memory, then temporary files)"),
    ("server.max_chunk_extension_size", 1 * KiB, "bytes",
     "chunk extensions are ignored, so they may not be used to send unbounded data: 400"),
    ("server.min_body_rate", 1024, "bytes/s", "after socket_timeout of grace a slower upload is cut with 408"),
    ("server.max_connections", 4096, "connections", "beyond this new clients get 503 at once instead of hanging"),
    ("server.max_pipelined_requests", 16, "requests",
     "requests answered from read-ahead before the connection yields its worker"),
    ("server.shutdown_timeout", 10.0, "seconds", "in-flight requests get this long on stop"),
    ("server.trusted_proxies", (), "addresses", "peers whose Forwarded / X-Forwarded-* headers are believed"),
    ("server.workers", 1, "processes",
     "child processes accepting on one socket, each with its own thread pool; 1 serves in this process"),
    ("server.socket_file", "", "path", "listen on this Unix domain socket instead of host and port"),
    ("server.socket_file_mode", 0o660, "mode", "permissions of socket_file (octal): who may connect"),
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
    ("log.access_file", "", "path", "append the access log here"),
    ("log.access_format", "common", "common|combined",
     "access log lines: Common Log Format, or combined (adds Referer and User-Agent); one format per process"),
    ("log.error_file", "", "path", "append the error log (with tracebacks) here"),
    ("engine.pidfile", "", "path", "write the process id here; refuse to start while that process lives"),
    ("engine.daemonize", False, "flag", "detach from the terminal (double fork), for init systems without supervision"),
    ("engine.user", "", "user", "when started as root: switch to this user (name or uid) once bound"),
    ("engine.group", "", "group", "with engine.user: this group instead of the user's own"),
    ("engine.umask", 0o022, "mode", "umask set when switching user"),
    ("engine.autoreload.on", False, "flag", "restart the app in a new process when its files change"),
    ("engine.autoreload.frequency", 1.0, "seconds", "how often the reloader polls"),
    ("engine.autoreload.files", (), "paths", "extra files the reloader watches"),
)

_UNIT_TYPES = {
    "host": str, "path": str, "flag": bool, "seconds": float, "addresses": tuple, "paths": tuple, "port": int,
    "threads": int, "bytes": int, "fields": int, "bytes/s": int, "connections": int, "requests": int, "parts": int,
    "common|combined": str, "processes": int, "mode": int, "user": str, "group": str,
}
_ROWS = {row[0]: row for row in LIMITS}
# Other numbers: 0 and up.
_UNIT_RANGES = {"port": (0, 65535), "threads": (1, None), "processes": (1, None), "mode": (0, 0o777)}


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
    if "|" in unit and value not in unit.split("|"):
        raise ConfigError("config key %r must be one of %s, got %r" % (key, unit.replace("|", ", "), value))
    low, high = _UNIT_RANGES.get(unit, (0, None))
    if want in (int, float) and (value < low or (high is not None and value > high)):
        wanted = "%d to %d" % (low, high) if high is not None else "at least %d" % low if low else "non-negative"
        raise ConfigError("config key %r must be %s, got %r" % (key, wanted, value))
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
    """The defaults updated with an INI file's ``[global]`` section (path sections are checked
    too, and are the application's: see ``tree.mount``); values are Python literals, never executed."""
    flat, sections = _read_ini(path)
    for section, keys in sections.items():
        _checked(keys, "[%s]" % section)
    return dict(make_config(), **_checked(flat))


# -- layered configuration: namespaces and sections ----------------------------
# CherryPy's three levels: the process (minipub.config, an INI [global]), an
# application's path sections ({"/": {...}, "/static": {...}}, [/static]: that
# path and below, the deepest wins) and ``_cp_config`` on the objects of the
# tree (class < instance < handler, merged while walking).  Every key is
# checked where it is given, by its namespace: a typo is a ConfigError that
# names the key and its section, at startup, never a setting silently ignored.

_HOOK_POINTS = ("on_start_resource", "before_request_body", "before_handler", "before_finalize",
                "on_end_resource", "before_error_response", "after_error_response", "on_end_request")
# Keys that make sense below the whole process: what a request may do, not how the server runs.
_PATH_KEYS = frozenset(k for k in _ROWS if k.startswith("request.")) | {"server.max_request_body_size"}


def _check_key(key: str, value, section: str):
    """``value`` as stored for ``key`` in ``section`` ("[global]", "[/path]" or "_cp_config of X")."""
    if key in _ROWS:
        if section != "[global]" and key not in _PATH_KEYS:
            raise ConfigError("config key %r in %s: it applies to the whole process; put it in [global]"
                              % (key, section))
        return _convert(key, value)
    namespace, _, rest = key.partition(".")
    check = _NAMESPACES.get(namespace)
    if check is None or not rest:
        raise ConfigError("unknown config key %r in %s" % (key, section))
    return check(rest, value, key, section)


def _checked(keys: dict, section: str = "[global]") -> dict:
    """``keys`` as stored: each one checked by _check_key for ``section``."""
    return {key: _check_key(key, value, section) for key, value in keys.items()}


def _check_tool_key(rest, value, key, section):
    name, _, arg = rest.partition(".")
    tool = tools.__dict__.get(name)
    if not isinstance(tool, Tool):
        known = ", ".join(sorted(n for n, t in vars(tools).items() if isinstance(t, Tool)))
        raise ConfigError("unknown tool %r in config key %r in %s (tools: %s)" % (name, key, section, known))
    if arg not in ("on", "priority") and not tool.accepts(arg):
        raise ConfigError("tool %r takes no argument %r (config key %r in %s)" % (name, arg, key, section))
    return value


def _check_error_page_key(rest, value, key, section):
    if not (rest == "default" or (rest.isdigit() and 400 <= int(rest) <= 599)):
        raise ConfigError("config key %r in %s: use error_page.404 ... or error_page.default" % (key, section))
    if not (callable(value) or isinstance(value, str)):
        raise ConfigError("config key %r in %s wants a file path or a callable" % (key, section))
    return value


def _check_hooks_key(rest, value, key, section):
    hooks = value if isinstance(value, (list, tuple)) else [value]
    if rest not in _HOOK_POINTS or not all(callable(h) for h in hooks):
        raise ConfigError("config key %r in %s: hooks.POINT = callable, POINT one of %s"
                          % (key, section, ", ".join(_HOOK_POINTS)))
    return tuple(hooks)


# The request.* and response.* keys that are not LIMITS rows, and what each value must be.
_VALUE_CHECKS = {"request.dispatch": lambda value: isinstance(value, Dispatcher), "request.error_response": callable,
                 # generators are always streamed; the key is accepted for CherryPy programs
                 "response.stream": lambda value: isinstance(value, bool)}


def _check_value_key(rest, value, key, section):
    if key.startswith("response.headers.") and _NAME.fullmatch(rest[8:]):  # response.headers.NAME = "text"
        if isinstance(value, str):
            return value
    elif _VALUE_CHECKS.get(key, lambda value: False)(value):
        return value
    raise ConfigError("unknown config key %r in %s" % (key, section))


_NAMESPACES = {"tools": _check_tool_key, "error_page": _check_error_page_key, "hooks": _check_hooks_key,
               "request": _check_value_key, "response": _check_value_key}


def _read_sections(config) -> tuple:
    """A dict (flat keys, "global" and "/path" sections) or an INI path -> (global keys, {path: keys})."""
    if config is None:
        return {}, {}
    if isinstance(config, (str, os.PathLike)):
        return _read_ini(os.fspath(config))
    if not isinstance(config, dict):
        raise ConfigError("config must be a dict or an INI file's path, not %s" % type(config).__name__)
    flat, sections = {}, {}
    for key, value in config.items():
        if key == "global" or key.startswith("/"):
            if not isinstance(value, dict):
                raise ConfigError("config section %r must be a dict of keys" % (key,))
            if key == "global":
                flat.update(value)
            else:
                path = key.rstrip("/") or "/"
                sections.setdefault(path, {}).update(value)
        else:
            flat[key] = value
    for path, keys in sections.items():
        if "tools.staticdir.dir" in keys:  # the tool serves what lies below its own section
            keys.setdefault("tools.staticdir.section", path)
    return flat, sections


def _read_ini(path: str) -> tuple:
    import ast
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive, like CherryPy's
    try:
        if not parser.read(path, encoding="utf-8"):
            raise ConfigError("cannot read config file %r" % (path,))
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError("%s, line %d: no section header; put the settings under [global]"
                          % (path, exc.lineno)) from None
    except (configparser.Error, UnicodeDecodeError) as exc:  # a line that is not key = value, ...
        raise ConfigError("%s: %s" % (path, str(exc).splitlines()[0])) from None
    config = {}
    for section in parser.sections():
        if section != "global" and not section.startswith("/"):
            raise ConfigError("%s: unknown section [%s]; use [global] or a path such as [/static]"
                              % (path, section))
        values = config.setdefault(section, {})
        for key, text in parser.items(section):
            try:
                values[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ConfigError("%s: [%s] %s = %s is not a Python literal (quote strings)"
                                  % (path, section, key, text)) from None
    return _read_sections(config)


class Settings(dict):
    """``minipub.config``: the process-wide configuration (CherryPy's ``cherrypy.config``).

    ``update()`` takes a dict or an INI path; only its global part is taken here (path sections
    belong to an application).  Every change bumps ``version``, so applications re-merge the
    configuration of a path once, at its next request, instead of on every request."""

    def __init__(self):
        super().__init__(make_config(), **_DEFAULT_TOOLS)
        self.version = 0

    def update(self, other=None, **more) -> None:
        flat, sections = _read_sections(other)
        if sections and isinstance(other, dict) and "global" not in other:
            raise ConfigError("path sections %s belong to an application: pass them to tree.mount() or "
                              "quickstart()" % ", ".join(sorted(sections)))
        flat.update(more)
        super().update(_checked(flat))
        self.version += 1

    def __setitem__(self, key, value):
        self.update({key: value})

    def reset(self) -> None:
        """Back to the defaults of LIMITS (for tests)."""
        self.clear()
        super().update(make_config(), **_DEFAULT_TOOLS)
        self.version += 1


_DEFAULT_TOOLS = {"tools.trailing_slash.on": True}  # as CherryPy: an index gets its slash
config = Settings()
_PROCESS_CONFIG = config  # for functions whose ``config`` parameter (CherryPy's name) hides it


def _limits(settings) -> dict:
    """The LIMITS keys of a configuration (what Server and the engine take)."""
    return {key: settings[key] for key in _ROWS if key in settings}


# ===========================================================================
# Errors
# Contract: HTTPError and its subclasses carry the status to answer with.
# ProtocolError is what the parser raises for bad framing; after one the
# server answers once and closes the connection.
# ===========================================================================

class HTTPError(Exception):
    """Answer the request with ``status``, an error page showing ``message`` and ``headers``."""

    def __init__(self, status: int = 500, message: str = None, headers: list = None):
        self.status, self.message, self.headers = int(status), message, headers  # [(name, value)]
        super().__init__(status, message)

    @property
    def code(self) -> int:
        return self.status

    def set_response(self) -> None:
        """Make minipub.response this error's page now (CherryPy's HTTPError.set_response)."""
        req = _local.request
        req.app.error(req, _local.response, self.status, self.message, self.headers)


class NotFound(HTTPError):
    def __init__(self, message: str = None):
        super().__init__(404, message)


class HTTPRedirect(Exception):
    """Redirect to ``urls`` (a URL or a list; the first is used) with a 3xx status, 303 by default;
    each is made absolute against the request."""

    def __init__(self, urls, status: int = None):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        status = 303 if status is None else int(status)
        if not 300 <= status <= 399 or not self.urls:
            raise ValueError("a redirect needs a URL and a 3xx status, not %r" % (status,))
        self.url, self.status = self.urls[0], status
        super().__init__(self.url, status)

    def set_response(self) -> None:
        req = _local.request
        req.app.redirect(req, _local.response, self)


class ProtocolError(HTTPError):
    """The bytes on the wire are not acceptable HTTP/1.1; the connection closes."""


class _ClientGone(Exception):
    """The peer closed or reset the connection; nothing more can be sent."""


class _Overflow(_ClientGone):
    """Over server.max_unsent_bytes: 503 if none of the response went yet, else the connection closes."""


# ===========================================================================
# Server: accept, poll, workers
# Contract: all socket I/O lives in this section, in three roles behind the
# Server facade.  _PollRole owns the selector, the listening socket (through
# its _Acceptor) and every connection that is *waiting*: for its TLS
# handshake, the rest of its head, its whole body (see _Body), its
# next keep-alive request, a slow reader to take queued output, or a
# lingering close; it never blocks on a client, so slow or silent clients
# cost a file descriptor, not a thread.  _Pool is the bounded set of workers:
# the one holding the poll role polls, then serves the connections it found
# ready (WSGI application, response) before polling again: under the GIL a
# request that never changes threads is the fastest.  Its watchdog wakes
# another worker only when the serving ones stall (an application waiting on
# something), so up to server.thread_pool requests run at once; an idle
# server makes no periodic wake-ups.  _Conn is one connection, its unsent
# output and the workers' I/O on it.  Whatever a client does (a reset
# at any step, a half handshake, garbage) ends its own connection only; only
# a failure of the listening socket stops the server, with one error line.
# ===========================================================================

_ACCEPT, _WAKE = object(), object()
_TICK = 0.005  # how often the watchdog checks that the serving threads make progress
_STALL = 10    # ticks a request may compute before another worker takes the poll role
_QUIET = 40    # ticks without traffic before the watchdog sleeps until the next request
_RECV = 256 * KiB
# After answering with unread input (an error, or a body we did not want) the
# socket is half-closed and read for this long before closing: closing at once
# would send a reset, which can destroy the answer before the client reads it.
_LINGER_CLOSE = 2.0
_OUT_MEMORY = 256 * KiB  # unsent output of one connection kept in memory; more goes to its temporary file
_PAUSE = 0.25  # out of descriptors: accept is tried again after this long, or once a connection closed
_FD_SPARE = 64  # descriptors kept beyond server.max_connections: listener, selector, the app's files
_STOP_ROUND = 0.05  # while stopping, the poll role re-checks this often whether the drain is over
_AF_UNIX = getattr(socket, "AF_UNIX", None)  # absent on some Windows builds


_BACKLOG = 1024  # connections the kernel queues before accept()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for ``host`` (name, IPv4, IPv6, 0.0.0.0 or ::)."""
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    host = host.encode() if host.isascii() else host  # a str is IDNA-encoded: +0.4 MB of codec, resident
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart binds despite TIME_WAIT
        if family == socket.AF_INET6 and address[0] == "::":
            try:  # '::' means every interface, IPv4 included where the OS allows
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (AttributeError, OSError):
                pass
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _listen_socket(config: dict) -> socket.socket:
    """The socket to serve: systemd's (socket activation), else server.socket_file, else host and port."""
    inherited = _systemd_socket()
    if inherited is not None:
        return inherited
    if config["server.socket_file"]:
        return _unix_socket(config["server.socket_file"], config["server.socket_file_mode"])
    return bind_socket(config["server.socket_host"], config["server.socket_port"])


def _systemd_socket():
    """sd_listen_fds(3): "LISTEN_PID is set to the PID of the process that shall receive the file
    descriptors, LISTEN_FDS to their number; they start at SD_LISTEN_FDS_START (3)"."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None  # not for us (a parent's, left in the environment)
    count, names = os.environ.get("LISTEN_FDS", ""), os.environ.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        del os.environ[key]  # our children and the app's subprocesses must not adopt them again
    if count != "1":
        raise ConfigError("systemd passed %s sockets (%s); minipub serves one: give the .socket unit one "
                          "Listen line" % (count, names or "unnamed"))
    return socket.socket(fileno=3)  # family and type are read from the descriptor


_SOCKET_FILES = {}  # path -> inode of each server.socket_file this process made (and removes at exit)


def _unix_socket(path: str, mode: int) -> socket.socket:
    """A listening Unix domain socket at ``path`` with permissions ``mode``.  A socket file
    nobody accepts on (left by a crashed run) is replaced; any other file is refused."""
    import stat
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError("server.socket_file %r exists and is not a socket: not removing it" % path)
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(path) == 0:
                raise OSError("another process accepts on it")
        os.unlink(path)  # stale: nobody accepts on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o777)  # nobody may connect before chmod (no thread runs yet)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        _SOCKET_FILES[path] = os.stat(path).st_ino
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(umask)
    return sock


class _Conn:
    """A client connection, the parser that owns its buffered bytes, its unsent output, and I/O on it.

    Sockets stay non-blocking for their whole life (no poll() before each call, no settimeout()
    ioctl()); a non-blocking SSLSocket says "would block" with SSLWantReadError / SSLWantWriteError,
    so TLS goes through the same paths."""

    __slots__ = ("sock", "addr", "parser", "head", "deadline", "handshaking", "tls", "lingering", "late",
                 "want", "kind", "registered", "closing", "server", "out", "spill", "ready", "body")

    def __init__(self, sock, addr, server):
        self.sock, self.addr, self.parser = sock, addr, None
        self.tls = self.handshaking = server.ssl_context is not None
        self.want = server._want
        self.head = self.deadline = self.kind = None  # kind: the deadline waited for, None while served
        self.lingering = self.late = self.registered = self.closing = self.ready = False  # late: 503 (stopping)
        self.server, self.out, self.spill, self.body = server, deque(), None, None  # out: see queue()

    def send(self, data) -> None:
        """Send ``data`` now as far as the socket takes it; queue() the rest: a worker never waits."""
        if self.out:
            return self.queue(data)  # behind what is queued already: order is kept
        try:
            sent = self.sock.send(data)
        except self.want:
            sent = 0
        except OSError:
            raise _ClientGone() from None
        if sent < len(data):
            self.queue(memoryview(data)[sent:], sent > 0)

    def queue(self, data, went: bool = True) -> None:
        """Output for the poll role's flush: in memory up to _OUT_MEMORY, then in a temporary file.
        _Overflow over server.max_unsent_bytes (``went``: some of this output was sent)."""
        server, size = self.server, len(data)
        with server._unsent_lock:
            if server._unsent + size > server.config["server.max_unsent_bytes"]:
                raise _Overflow(went)
            server._unsent += size
        if self.spill is None and sum(len(item) for item in self.out if type(item) is bytes) + size > _OUT_MEMORY:
            import tempfile
            self.spill = tempfile.TemporaryFile()
        if self.spill is None:
            return self.out.append(bytes(data))
        self.spill.seek(0, os.SEEK_END)
        self.out.append([self.spill.fileno(), self.spill.tell(), size, True])  # True: counted in _unsent
        self.spill.write(data)
        self.spill.flush()

    def flush(self):
        """Send queued output until the socket would block; True if any went, None if none went
        and TLS must read first (a key update, a renegotiation).  OSError: gone."""
        progress = False
        while self.out:
            item = self.out[0]
            if type(item) is tuple:  # (exchange, environ): its response is all sent
                self.out.popleft()
                item[0].log(item[1])
                continue
            try:
                if type(item) is bytes:
                    sent = self.sock.send(item)
                elif self.tls:  # sendfile(2) cannot encrypt: a read and a send per step
                    sent = self.sock.send(os.pread(item[0], min(item[2], _RECV), item[1]))
                else:
                    sent = os.sendfile(self.sock.fileno(), item[0], item[1], min(item[2], GiB))
            except self.want as exc:  # SSLWantReadError: select() must wait to read, not to write
                return progress or (None if type(exc).__name__ == "SSLWantReadError" else False)
            progress = True
            if type(item) is bytes:
                self.release(sent)
                self.out[0] = item = item[sent:]
            elif not sent:  # the file shrank: the client must see the body end early
                self.release(item[2] if item[3] else 0)
                item[2], self.closing = 0, True
            else:
                self.release(sent if item[3] else 0)
                item[1], item[2] = item[1] + sent, item[2] - sent
            if not item or (type(item) is list and item[2] <= 0):
                self.out.popleft()
                if type(item) is list and not item[3]:
                    os.close(item[0])  # our dup() of the application's file
        return progress

    def release(self, size: int) -> None:
        with self.server._unsent_lock:
            self.server._unsent -= size

    def shut(self, answer: bytes = b"") -> bool:
        """Lingering close, first step: send ``answer`` if the socket takes it at once, then stop
        sending.  Closing with unread input would send a reset, which can destroy the answer."""
        self.lingering = True
        try:
            self.sock.send(answer) if answer else None
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False  # gone already: just close
        return True

    def drained(self) -> bool:
        """Lingering close: read and drop what the peer still sends; True once it closed."""
        try:
            for _ in range(64):
                if not self.sock.recv(_RECV):
                    return True
        except self.want:
            return False
        except OSError:
            return True
        return False  # a fast sender: more next round, until the linger deadline

    def handshake(self):
        """One non-blocking step of the TLS handshake: the selector events to wait for next
        (EVENT_READ once done: ``handshaking`` is False then), or None if it failed."""
        import ssl
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        except (ssl.SSLError, OSError) as exc:
            if getattr(exc, "reason", "") == "HTTP_REQUEST":  # plain HTTP on the TLS port
                _answer_plain_http(self.sock.fileno())
            return None
        self.handshaking = False
        return selectors.EVENT_READ

    def sendfile(self, file, offset: int, count: int) -> int:
        """Queue ``count`` bytes of ``file`` from ``offset`` and send what goes at once; returns the
        count queued: fewer when the file shrank (log rotation, a deploy)."""
        count = max(0, min(count, os.fstat(file.fileno()).st_size - offset))
        if count:
            self.out.append([os.dup(file.fileno()), offset, count, False])  # ours: the app closes its file
            try:
                self.flush()
            except OSError:
                raise _ClientGone() from None
        return count

    def discard(self) -> None:
        """Free what is queued: the memory, the temporary file, the file descriptors we dup()ed;
        a response cut short is logged with what was sent of it."""
        unsent = counted = 0
        for item in self.out:
            if type(item) is tuple:
                item[0].sent = max(0, item[0].sent - unsent)  # (its head and chunk framing counted)
                item[0].log(item[1])
            elif type(item) is bytes:
                unsent, counted = unsent + len(item), counted + len(item)
            else:
                unsent, counted = unsent + item[2], counted + (item[2] if item[3] else 0)
                if not item[3]:
                    os.close(item[0])
        self.release(counted)
        self.out.clear()
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        if self.body is not None:
            self.body.close()
            self.body = None


class _Body:
    """A request body, read by the poll role before a worker is given the request; then wsgi.input.

    The connection's parser decodes it (Content-Length or chunked) into memory up to
    server.body_buffer_size and beyond that into a temporary file, so an upload of any size and
    speed costs a descriptor, not a thread.  The application reads a BytesIO or the file."""

    __slots__ = ("parts", "file", "size", "since", "server", "held")

    def __init__(self, conn):
        self.parts, self.file, self.size, self.since = [], None, 0, time.monotonic()
        self.server, self.held = conn.server, 0  # held: this body's part of server._body_memory
        if conn.head.expect_continue and not conn.parser.buffer:
            # RFC 9110 10.1.1: "A server MAY omit sending a 100 (Continue) response if it has
            # already received some or all of the content for the corresponding request"
            conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def fill(self, conn, config: dict) -> bool:
        """Take what the parser holds and the socket has; True once the body is complete.
        HTTPError: bad framing, over the size limit (413), too slow (408) or no room on disk;
        _ClientGone: the peer closed.  After socket_timeout of grace the body must have kept
        min_body_rate; the poll role's "body" deadline catches one that stops."""
        parser, limit = conn.parser, config["server.body_buffer_size"]
        if (conn.head.content_length or 0) > limit:
            limit = 0  # bound for the disk: no copy in memory on the way
        rounds = 64  # recv() calls per turn: a fast upload starves nobody
        while True:
            event = parser.next_event(_RECV)
            while event is not NEED_DATA:
                if event is END_OF_MESSAGE:
                    self.add(b"", limit)  # the end: rewind the file
                    return True
                self.add(event, limit)
                event = parser.next_event(_RECV)
            rounds -= 1
            if rounds < 0 and not (conn.tls and conn.sock.pending()):  # select() sees the rest
                return False
            left = parser.body_left  # None when chunked; the parser's buffer is empty here
            try:
                data = conn.sock.recv(min(left, _RECV) if left else _RECV)
            except conn.want:
                rate, grace = config["server.min_body_rate"], config["server.socket_timeout"]
                if rate and self.size < (time.monotonic() - self.since - grace) * rate:
                    raise ProtocolError(408, "The request body arrived too slowly.\n") from None
                return False
            except OSError:
                raise _ClientGone() from None
            if not data:
                raise _ClientGone()
            if left:
                parser.took(len(data))
                self.add(data, limit)
            else:
                parser.buffer += data

    def add(self, data: bytes, limit: int) -> None:
        """Keep ``data``; empty at the end of the body.  HTTPError 507 or 503: no room on disk."""
        self.size += len(data)
        try:
            if self.file is None and (self.size > limit or not self._hold(len(data))):
                import tempfile
                self.file = tempfile.TemporaryFile()
                self.file.writelines(self.parts)
                self.parts = None
                self._hold(-self.held)
            if self.file is None:
                self.parts.append(data)
            elif data:
                self.file.write(data)
            else:
                self.file.seek(0)  # flushes it: a full disk may show only now
        except OSError as exc:
            raise _no_room(exc, "a request body of %d bytes" % self.size) from None

    def input(self):
        """The whole body as a stream for wsgi.input: read(), readline(), iteration."""
        if self.file is None:
            data, self.parts = b"".join(self.parts), None  # BytesIO shares the bytes: one copy in memory
            return io.BytesIO(data)
        return self.file

    def _hold(self, size: int) -> bool:
        """Count ``size`` more bytes (fewer if negative) of bodies in memory, all connections
        together: False over server.max_body_memory, so 4,096 clients of 1 MiB each cannot
        make the server hold 4 GiB (the body goes to a temporary file instead)."""
        server = self.server
        with server._unsent_lock:
            if size > 0 and server._body_memory + size > server.config["server.max_body_memory"]:
                return False
            server._body_memory += size
        self.held += size
        return True

    def close(self) -> None:
        """The body is done with (served, or its client gone): its memory or file goes."""
        if self.file is not None:
            self.file.close()
        self._hold(-self.held)


def _no_room(exc: OSError, what: str) -> HTTPError:
    """A temporary file could not be written: 507 if its directory is full, else 503; logged."""
    import errno
    import tempfile
    _logger().error("%s refused: cannot write to the temporary directory %s: %s",
                    what, tempfile.gettempdir(), exc.strerror or exc)
    full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    return HTTPError(507 if full else 503, "No room to store the upload; try again later.")


class _Acceptor:
    """The listening socket, run by the poll role: accept() new connections and start them off.

    accept(2) errors that concern one client (ECONNABORTED, EPROTO ...) are skipped; out of
    descriptors (EMFILE, ENFILE) every accept() would fail at once, so the listener leaves the
    selector (a busy loop otherwise) until a connection closes or _PAUSE passes, with one warning
    per episode; EBADF or EINVAL mean the listening socket itself is gone: the server stops.
    """

    def __init__(self, poll, sock):
        self.poll, self.sock, self.server, self.config = poll, sock, poll.server, poll.config
        self.listening, self.paused = True, None  # paused: [retry at, failed accepts, since, open connections]
        self.family, self.heads = int(sock.family), {}  # heads: shared by the connections (see RequestParser)
        poll.sel.register(sock, selectors.EVENT_READ, _ACCEPT)

    def accept(self) -> None:
        for _ in range(64):
            try:  # socket.accept() without its enum conversions of family and type (a tenth of a request)
                fd, addr = self.sock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                return self._failed(exc)
            conn = _Conn(socket.socket(self.family, socket.SOCK_STREAM, 0, fd), addr, self.server)
            try:
                self._adopt(conn)
            except Exception as exc:
                self.poll.failed(conn, exc)

    def _adopt(self, conn):
        poll = self.poll
        if len(poll.conns) >= self.config["server.max_connections"]:
            return self._refuse(conn.sock)
        poll.conns.add(conn)
        conn.parser, conn.late = RequestParser(self.config, self.heads), poll.drain_until is not None  # see _drain
        if self.family != _AF_UNIX:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.setblocking(False)
        if conn.tls:
            # Since the CVE-2023-40217 fix wrap_socket() reads one byte: a reset raises here.
            conn.sock = poll.ssl_context.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
            poll.wait(conn, "head")
        # Loopback and LAN clients have usually sent their request by now:
        # reading at once skips a registration and a trip through select().
        poll.readable(conn)

    def _refuse(self, sock):
        try:
            sock.send(_simple_response(503, "Too many connections; try again later.\n"))
        except OSError:
            pass
        sock.close()

    def _failed(self, exc):
        import errno
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            return self._pause(exc)
        if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT):
            self.stop()
            return self.server._fail("the listening socket failed: %s" % (exc,))
        _logger().debug("accept failed: %s", exc)  # that client is gone already

    def _pause(self, exc):
        if self.paused is None:
            _logger().warning("cannot accept connections: %s (%d open); pausing accept until one closes",
                              exc.strerror, len(self.poll.conns))
            self.paused = [0.0, 0, time.monotonic(), 0]
        self._unlisten()
        self.paused[0], self.paused[3] = time.monotonic() + _PAUSE, len(self.poll.conns)
        self.paused[1] += 1

    def retry(self) -> None:
        """While paused: accept again once a connection closed or the pause is over."""
        if time.monotonic() < self.paused[0] and len(self.poll.conns) >= self.paused[3]:
            return
        self.poll.sel.register(self.sock, selectors.EVENT_READ, _ACCEPT)
        self.listening = True
        self.accept()
        if self.listening:  # accepted, or nobody waiting: the episode is over
            _logger().warning("accepting connections again after %.1f s (%d accept attempts failed)",
                              time.monotonic() - self.paused[2], self.paused[1])
            self.paused = None

    def stop(self) -> None:
        """Accept no more (the socket stays open until the server closes it)."""
        self._unlisten()
        self.paused = None

    def _unlisten(self):
        if self.listening:
            self.listening = False
            self.poll.sel.unregister(self.sock)


class _Waits:
    """The poll role's bookkeeping of waiting connections: their selector registrations, and per
    kind of wait an insertion-ordered dict of deadlines (one timeout per kind, so the first entry
    is the soonest).  A connection being served waits for nothing: ``conn.kind`` is None."""

    def __init__(self, config):
        self.sel = selectors.DefaultSelector()
        self.timers = {"head": {}, "keepalive": {}, "linger": {}, "write": {}, "body": {}}
        self.timeouts = {"head": config["server.head_timeout"], "linger": _LINGER_CLOSE,
                         "keepalive": config["server.keepalive_timeout"],
                         "write": config["server.socket_timeout"], "body": config["server.socket_timeout"]}
        self.soonest = float("inf")  # no deadline is earlier; may be early (entries left), never late

    def wait(self, conn, kind, now: float = None):
        if conn.kind is not None:
            del self.timers[conn.kind][conn]
        conn.deadline = deadline = (now or time.monotonic()) + self.timeouts[kind]
        self.timers[kind][conn], conn.kind, self.soonest = deadline, kind, min(self.soonest, deadline)
        events = selectors.EVENT_WRITE if kind == "write" else selectors.EVENT_READ
        if conn.registered != events:
            self._watch(conn, events)

    def _watch(self, conn, events):
        if not conn.registered:
            self.sel.register(conn.sock, events, conn)
        elif conn.registered != events:
            self.sel.modify(conn.sock, events, conn)
        conn.registered = events

    def unwait(self, conn):
        if conn.kind is not None:
            del self.timers[conn.kind][conn]
            conn.kind = conn.deadline = None

    def expire(self) -> None:
        """Every connection whose deadline passed goes to ``expired()`` (the poll role's)."""
        now, due = time.monotonic(), []
        for kind, timers in self.timers.items():
            for conn, deadline in timers.items():
                if deadline > now:
                    break
                due.append((kind, conn))
        for kind, conn in due:
            self.expired(kind, conn)
        self.soonest = min([next(iter(timers.values())) for timers in self.timers.values() if timers],
                           default=float("inf"))


class _Drain:
    """The poll role's part in stopping: what is still to serve, closing idle connections, and
    closing everything at the end."""

    def _drain(self):
        """After stop(): idle keep-alive connections close; heads already on their way are read
        and served for up to a second; connections accepted meanwhile are answered 503 (closing
        the listener now would reset the ones in its backlog).  A reloader child stops accepting
        instead: it shares the listening socket with the next generation, which takes them."""
        now = time.monotonic()
        if self.drain_until is None:
            self.drain_until = now + min(1.0, self.config["server.head_timeout"])
            if _CHILD is not None:
                self.listener.stop()
        for conn in list(self.timers["keepalive"]) + (list(self.timers["head"]) if now >= self.drain_until else []):
            self.drop(conn)

    def busy(self) -> list:
        """The connections a worker is serving or about to serve."""
        return [conn for conn in list(self.conns) if conn.kind is None]

    def _drained(self) -> bool:
        """Nothing left to serve (lingering closes do not hold up the stop)."""
        if self.pending or self.busy():
            return False
        late = self.drain_until is not None and time.monotonic() >= self.drain_until
        return late or not (self.timers["head"] or self.timers["body"] or self.timers["write"])

    def close_all(self, selector: bool) -> None:
        for conn in list(self.conns):
            conn.discard()
            try:
                conn.sock.close()
            except OSError:
                pass
        self.conns.clear()
        if selector:
            self.sel.close()
        for sock in (self.listener.sock, self.wake_r, self.wake_w):
            sock.close()


class _PollRole(_Waits, _Drain):
    """The selector and every waiting connection, with their deadlines; the _Acceptor's events.

    Only the worker holding the pool's poll lock calls in; serving threads hand connections back
    through ``handback`` and the wake pipe.  A connection stays in the selector while it is
    served (no epoll_ctl() per request) unless another round sees it readable meanwhile; the
    deadlines of waiting ones are kept by _Waits, and its part in stopping is _Drain's.  An
    OSError on one connection (ssl.SSLError too) drops it at debug level, any other exception is
    logged with its traceback and drops it too.
    """

    def __init__(self, server, sock):
        self.server, self.config = server, server.config
        self.ssl_context, self.want = server.ssl_context, server._want
        self.conns, self.pending, self.handback = server._conns, server._pending, deque()
        _Waits.__init__(self, server.config)
        self.sleeping = self.broken = False
        self.polls, self.pool = 0, None
        self.drain_until = None  # set by the first round after stop()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, _WAKE)
        self.listener = _Acceptor(self, sock)

    def round(self, cap: float = None) -> None:
        """One select() (at most ``cap`` long) and what it found; the caller holds the poll lock."""
        self.polls += 1
        if self.server._stopping:
            self._drain()
            cap = _STOP_ROUND if cap is None else min(cap, _STOP_ROUND)
        # Serving threads write to the wake pipe only while we sleep (see
        # _Pool._give_back); checking handback after announcing it closes the race.
        self.sleeping = True
        timeout = 0 if self.handback else self.next_timeout()
        if cap is not None:
            timeout = cap if timeout is None else min(cap, timeout)
        events = self.sel.select(timeout)
        self.sleeping = False
        if self.pool.watch_parked:
            self.pool.watch_event.set()  # traffic again: the watchdog resumes its ticks
        for key, _ in events:
            conn = key.data
            if conn is _ACCEPT:
                self.listener.accept()
            elif conn is _WAKE:
                try:
                    self.wake_r.recv(4096)  # a wake-up is sent only while we sleep: few bytes
                except self.want:
                    pass
            elif conn.kind is None:  # being served by another thread: out until handed back
                conn.registered = False
                self.sel.unregister(conn.sock)
            else:
                try:
                    self.readable(conn)
                except Exception as exc:
                    self.failed(conn, exc)
        while self.handback:
            self.rewait(self.handback.popleft())
        if time.monotonic() >= self.soonest:
            self.expire()
        if self.listener.paused is not None:
            self.listener.retry()
        if self.server._stopping and self._drained():
            self.pool.exit()

    def failed(self, conn, exc) -> None:
        """Handling ``conn`` raised: drop that connection, keep serving everyone else."""
        if isinstance(exc, OSError):
            _logger().debug("connection from %s dropped: %s", conn.addr, exc)
        else:
            _logger().error("internal error handling the connection from %s; closed it", conn.addr, exc_info=exc)
        self.drop(conn)

    def readable(self, conn, idle="head"):
        """Read from ``conn``; ``idle`` names its deadline if nothing has come yet."""
        if conn.kind == "write":
            return self.flush(conn)
        if conn.kind == "body":
            return self._body(conn)
        if conn.lingering:
            return self.drop(conn) if conn.drained() else None
        if conn.handshaking:
            events = conn.handshake()
            if events is None:
                return self.drop(conn)
            self._watch(conn, events)
            if conn.handshaking:
                return
        try:
            outcome = self._pull(conn)
        except ProtocolError as err:
            self.unwait(conn)
            return self.reject(conn, err)
        if outcome is NEED_DATA:
            if conn.kind is None:
                self.wait(conn, "head" if conn.parser.buffer else idle)
            elif conn.parser.buffer and conn.kind != "head":
                self.wait(conn, "head")  # the head deadline starts at its first byte
            return
        self.unwait(conn)
        if outcome is None:
            self.drop(conn)
        elif conn.late:
            self.reject(conn, HTTPError(503, "The server is shutting down; try again in a moment.\n"))
        elif conn.parser.in_body:
            self.start_body(conn)
        else:
            self.pending.append(conn)  # this thread serves it once its poll round ends

    def start_body(self, conn):
        """A request with a body: read here first (see _Body), then a worker serves it."""
        conn.body = _Body(conn)
        self._body(conn)

    def _body(self, conn):
        """Read more of the body; a worker gets the request once it is whole."""
        try:
            done = conn.body.fill(conn, self.config)
        except HTTPError as err:  # ProtocolError (framing, 413, 408), or no room on disk
            self.unwait(conn)
            return self.reject(conn, err)
        except _ClientGone:
            return self.drop(conn)  # the buffer and temporary file go with it, at once
        if done:
            self.unwait(conn)
            return self.pending.append(conn)
        self.wait(conn, "body")

    def _pull(self, conn):
        """Read what the socket has: NEED_DATA, None (closed) or conn (head complete)."""
        while True:
            try:
                data = conn.sock.recv(_RECV)
            except self.want:
                return NEED_DATA
            except OSError:
                return None
            if not data:
                return None
            conn.parser.buffer += data  # receive(), without the call
            head = conn.parser.next_event()
            if head is not NEED_DATA:
                conn.head = head
                return conn
            if not (conn.tls and conn.sock.pending()):
                return NEED_DATA  # TLS may hold decrypted bytes that select() cannot see

    def reject(self, conn, err):
        """Answer an error from the poll role (non-blocking), then close without a reset."""
        self.linger(conn, _simple_response(err.status, err.message))

    def linger(self, conn, answer: bytes = b""):
        if conn.shut(answer):
            self.wait(conn, "linger")
        else:
            self.drop(conn)

    def drop(self, conn):
        """Close ``conn`` and forget it (the selector first: a closed descriptor is reused at once)."""
        self.unwait(conn)
        if conn.registered:
            conn.registered = False
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):  # a failure came between register and registered
                pass
        self.conns.discard(conn)
        conn.discard()
        try:
            conn.sock.close()
        except OSError:
            pass

    def flush(self, conn):
        """The socket of a connection with queued output drains: send more; once all went, go on."""
        try:
            progress = conn.flush()
        except OSError:
            return self.drop(conn)
        if not conn.out:
            conn.discard()  # its temporary file
            self.rewait(conn)
        elif progress:
            self.wait(conn, "write")  # the deadline counts from the last progress
        elif progress is None:
            self._watch(conn, selectors.EVENT_READ)  # readable() flushes again: no busy loop

    def rewait(self, conn):
        """A served connection comes back: to wait for its next request, to linger, or to close."""
        try:
            if conn.out:
                self.wait(conn, "write")  # what it queued goes first, then the rest of this
            elif conn.ready:  # a pipelined request read while its output was queued, or with a body
                conn.ready = False
                self.unwait(conn)
                if conn.parser.in_body:
                    self.start_body(conn)
                else:
                    self.pending.append(conn)
            elif conn.closing or (self.server._stopping and not conn.lingering):
                self.drop(conn)  # idle between requests while stopping: closing is allowed
            elif conn.lingering:
                self.linger(conn)
            elif conn.tls and conn.sock.pending():
                self.readable(conn, "keepalive")  # decrypted bytes select() cannot see
            else:
                self.wait(conn, "head" if conn.parser.buffer else "keepalive")
        except Exception as exc:
            self.failed(conn, exc)

    # -- deadlines ------------------------------------------------------------
    def next_timeout(self):
        paused = self.listener.paused
        soonest = self.soonest if paused is None else min(self.soonest, paused[0])
        return None if soonest == float("inf") else max(0.0, soonest - time.monotonic())

    def expired(self, kind, conn):
        try:
            if kind == "body" or (kind == "head" and conn.parser.buffer):
                self.unwait(conn)
                self.reject(conn, ProtocolError(408, "Request %s took too long.\n" % kind))
            else:
                self.drop(conn)
        except Exception as exc:
            self.failed(conn, exc)


class _Pool:
    """The worker threads and the watchdog that adds workers when the serving ones stall.

    Leader/followers: the thread holding ``poll_lock`` polls; connections found ready go to
    ``pending``, and the same thread then serves them itself, so a request usually needs no
    hand-off between threads.  A thread finding the poll role taken and nothing pending parks
    on its own gate (a stack: the most recently busy thread is woken first).  Parked threads
    are woken only by the watchdog, when the serving threads stall (an application waiting on
    something), so with the GIL at most as many threads run as are needed.  Workers start on
    demand up to server.thread_pool: an idle server runs one.
    """

    def __init__(self, server, poll):
        self.server, self.poll, self.pending, self.config = server, poll, server._pending, server.config
        self.workers, self.idle = [], []
        self.lock, self.poll_lock = threading.Lock(), threading.Lock()
        self.exiting = self.watch_parked = False
        self.watch_event = threading.Event()
        self.done = 0
        poll.pool = self

    def spawn(self) -> None:
        gate = threading.Lock()
        gate.acquire()
        worker = threading.Thread(target=self._run, args=(gate,), name="minipub-%d" % len(self.workers),
                                  daemon=True)
        worker.start()  # returns once it runs: a worker in the list is alive
        self.workers.append(worker)

    def lead(self, cap: float = None) -> None:
        """One round of the poll role; the caller took poll_lock, released here."""
        try:
            self.poll.round(cap)
        except Exception as exc:  # not one connection's doing: the poll role itself is broken
            self.poll.broken = True
            self.server._fail("internal error in the poll role", exc)
            self.exit()
        finally:
            self.poll_lock.release()

    def exit(self) -> None:
        """No more polling: workers finish what they hold, then return."""
        with self.lock:
            self.exiting = True
            while self.idle:
                self.idle.pop().release()

    # -- the watchdog ---------------------------------------------------------
    def watch(self) -> None:
        """Tick while there is traffic; wake a parked worker when the serving ones stall: no round and
        no request done since the last tick, and under half its CPU time used (waiting, not computing:
        a slow machine or valgrind changes no threads), or no progress for _STALL ticks."""
        poll, quiet, seen, stalled, cpu = self.poll, 0, None, 0, 0.0
        while not self.server._stopping:
            if quiet >= _QUIET:
                self.watch_event.clear()
                self.watch_parked = True
                if poll.sleeping and not self.pending and not self.server._stopping:
                    self.watch_event.wait()  # idle: no periodic wake-ups
                self.watch_parked, quiet = False, 0
            else:
                time.sleep(_TICK)
            quiet = quiet + 1 if poll.sleeping and not self.pending else 0
            progress, used = (poll.polls, self.done), time.process_time()
            stalled = stalled + 1 if progress == seen and not poll.sleeping else 0
            if stalled and (used - cpu < _TICK / 2 or stalled >= _STALL) and not self.wake_one() \
                    and self.poll_lock.acquire(blocking=False):  # every worker is in the application:
                self.lead(cap=_TICK)  # keep accepting and reading heads here
                self.wake_one()  # a worker that finished meanwhile parked: the poll role is its
            seen, cpu = progress, used

    def wake_one(self) -> bool:
        """Wake a parked worker, or start one while fewer than server.thread_pool exist."""
        with self.lock:
            if self.idle:
                self.idle.pop().release()
                return True
            if self.exiting or len(self.workers) >= self.config["server.thread_pool"]:
                return False
            self.spawn()
        return True

    # -- workers --------------------------------------------------------------
    def _run(self, gate):
        pending, poll_lock = self.pending, self.poll_lock
        while True:
            if pending:
                try:
                    conn = pending.popleft()
                except IndexError:  # another worker took it first
                    continue
                if not self._serve_conn(conn):
                    continue
            elif self.exiting:
                return
            elif not poll_lock.acquire(blocking=False):
                self._park(gate)
                continue
            if self.exiting or pending:  # holding poll_lock here
                poll_lock.release()
            else:
                self.lead()

    def _park(self, gate):
        with self.lock:
            if self.pending or self.exiting or not self.poll_lock.locked():
                return  # there is work, or the poll role is free
            self.idle.append(gate)
        gate.acquire()

    def _serve_conn(self, conn) -> bool:
        """Answer requests on ``conn``, then hand it back; True if this thread now holds poll_lock."""
        server, parser, keep = self.server, conn.parser, False
        try:
            for _ in range(self.config["server.max_pipelined_requests"]):
                more = _Exchange(server, conn).run()
                self.done += 1
                if not more or server._stopping:
                    break
                try:
                    head = parser.next_event()
                    if head is END_OF_MESSAGE:  # of a request without a body
                        head = parser.next_event() if parser.buffer else NEED_DATA
                except ProtocolError as err:
                    _Exchange(server, conn).fail(err.status, err.message)
                    break
                if head is not NEED_DATA:
                    conn.head = head
                if head is NEED_DATA or conn.out or parser.in_body:  # a body is read by the poll role
                    keep, conn.ready = True, head is not NEED_DATA
                    break
            else:
                self.pending.append(conn)  # fairness: a deep pipeline goes to the back of the line
                return False
        except _ClientGone:
            conn.discard()
        except Exception:  # a bug in minipub itself: never let a worker die
            _logger().exception("internal error serving %s", conn.addr)
        if keep is False:
            # unread input: a plain close would send a reset
            conn.lingering = bool(parser.in_body or parser.buffer or parser.error)
            conn.closing = not conn.lingering
        return self._give_back(conn)

    def _give_back(self, conn) -> bool:
        """A served connection returns to the poll role (to wait, linger or close), directly if it
        is free: True then, and this thread holds poll_lock (its next round takes no second lock)."""
        poll = self.poll
        if self.poll_lock.acquire(blocking=False):
            poll.rewait(conn)
            return True
        poll.handback.append(conn)
        if poll.sleeping:
            self.server._wake()
        return False


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
        self._sock, self._thread, self._poll, self._pool = sock, None, None, None
        self._conns, self._pending = set(), deque()  # shared by the poll role and the pool
        self._stopping = self._abandon = False
        self._failure = None
        self._ready = threading.Event()
        self._want = (BlockingIOError, InterruptedError)
        self._access = None
        self._unsent, self._unsent_lock = 0, threading.Lock()  # bytes queued by all _Conn.queue()
        self._body_memory = 0  # bytes of request bodies in memory (_Body._hold), under the same lock
        self._env = None  # the environ keys of every request, built at the first

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "Server":
        """Bind and serve in a background thread; returns once accepting."""
        self._prepare()
        self._launch()
        self._thread = threading.Thread(target=self._watch, name="minipub-watch", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until stop(), Ctrl-C or SIGTERM (a second one stops at once).
        If the listening socket fails, logs one error line and raises SystemExit(1)."""
        self._prepare()
        restore = self._install_signals()  # before the first request: a SIGTERM may follow it at once
        try:
            self._launch()
            self._watch()
        finally:
            restore()
        if self._failure is not None:
            raise SystemExit(1)

    def stop(self, timeout: float = None) -> None:
        """Stop accepting, let in-flight requests finish, close everything."""
        self._stopping = True
        self._wake()
        if self._pool is not None:
            self._pool.watch_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def urls(self) -> list:
        """The startup line(s): the URL served, plus loopback for a wildcard address."""
        scheme = "https" if self.ssl_context else "http"
        if self._sock is not None and self._sock.family == _AF_UNIX:
            return ["http://unix:%s:/ (Unix socket)" % self._sock.getsockname()]
        bound = self._sock.getsockname()[0] if self._sock else self.host

        def url(host):
            return "%s://%s:%d/" % (scheme, "[%s]" % host if ":" in host else host, self.port)
        if bound == "0.0.0.0":
            return [url(bound) + " (every IPv4 interface)", url("127.0.0.1") + " (this machine)"]
        if bound == "::":
            try:
                v6only = self._sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            except (AttributeError, OSError):
                v6only = True
            which = "IPv6" if v6only else "IPv4 and IPv6"
            return [url(bound) + " (every %s interface)" % which, url("::1") + " (this machine)"]
        return [url(self.host.strip("[]") or bound)]

    def _prepare(self):
        if self._poll is not None:
            return  # already bound (serve() prepares early to print its URLs)
        if self.ssl_context is None and self.config["server.ssl_certificate"]:
            self.ssl_context = make_ssl_context(self.config)
        if self.ssl_context is not None:
            import ssl
            self._want += (ssl.SSLWantReadError, ssl.SSLWantWriteError)
            _attach_sni(self.ssl_context, self.app, self.config)
        if self._sock is None:
            self._sock = bind_socket(self.host, self.port)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1] if self._sock.family != _AF_UNIX else 0
        _fit_descriptors(self.config)
        self._poll = _PollRole(self, self._sock)
        self._pool = _Pool(self, self._poll)
        self._wake_w = self._poll.wake_w
        access = _logger("access")
        if access.isEnabledFor(20) and access.hasHandlers():  # else skip formatting each line
            self._access = access.info

    def _launch(self):
        """Start serving (after serve() has logged and reported ready)."""
        self._pool.spawn()  # more workers only when the watchdog needs them: idle costs one thread
        self._ready.set()

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # embedded in a thread: the host program owns signals
        import signal

        def on_signal(signum, frame):
            if self._stopping and isinstance(self, Server):
                self._abandon = True  # a second Ctrl-C or SIGTERM: stop at once
            self._stopping = True
            self._wake()
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    def _wake(self):
        """Wake the poll role, which wakes a parked watchdog (the reloader's supervisor shares this).
        Safe in a signal handler: it takes no lock the interrupted thread may hold."""
        try:
            self._wake_w.send(b"\0")
        except (AttributeError, OSError):
            pass  # not started yet, or the pipe is full: a wake-up is pending anyway

    def _fail(self, what: str, exc: BaseException = None) -> None:
        """The listening socket (or the poll role itself) failed: one error line, then stop."""
        if self._failure is None:
            self._failure = what
            _logger().error("%s; stopping", what, exc_info=exc)
        self._stopping = True
        self._pool.watch_event.set()

    def _watch(self):
        self._pool.watch()
        self._finish()

    def _finish(self):
        """After stop: drain (server.shutdown_timeout at most), wait for the workers, close everything."""
        poll, pool, timeout = self._poll, self._pool, self.config["server.shutdown_timeout"]
        _logger().info("stopping: waiting up to %g s for %d requests", timeout, len(poll.busy()))
        deadline = time.monotonic() + timeout
        self._wake()
        while not (self._abandon or pool.exiting or time.monotonic() >= deadline):
            if pool.poll_lock.acquire(timeout=_STOP_ROUND):  # drive the drain if no worker does
                pool.lead()
        pool.exit()
        for worker in pool.workers:
            while worker.is_alive() and not self._abandon and time.monotonic() < deadline:
                worker.join(_STOP_ROUND)  # in slices: a second signal must cut the wait short
        for conn in poll.busy():
            head = conn.head
            _logger().warning("stopping: abandoned %s %s from %s", head.method if head else "a request",
                              head.target if head else "", conn.addr[0] if conn.addr else "-")
        poll.close_all(selector=pool.poll_lock.acquire(timeout=1.0))  # a stuck round keeps its selector



def _answer_plain_http(fd: int) -> None:
    """Tell a plain-HTTP client on the TLS port what is wrong, bypassing ssl (non-blocking)."""
    try:
        os.write(fd, _simple_response(400, "This port speaks HTTPS; use an https:// URL.\n"))
        # ssl read only the first bytes; closing with the rest unread
        # would send a RST that can destroy the 400 before it is read.
        for _ in range(16):  # bounded: the poll role must not be held
            if not os.read(fd, _RECV):
                break
    except OSError:  # BlockingIOError ends the drain
        pass


def _fit_descriptors(config: dict) -> None:
    """Raise the soft RLIMIT_NOFILE toward the hard limit as far as server.max_connections needs,
    then lower max_connections below what the process may open, so accept() does not hit EMFILE."""
    try:
        import resource
    except ImportError:  # Windows has no rlimits
        return
    want = config["server.max_connections"] + _FD_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass  # not allowed here: fit below the limit we have
    most = soft - min(_FD_SPARE, soft // 4)
    if config["server.max_connections"] > most:
        _logger().info("server.max_connections lowered to %d: this process may open %d files", most, soft)
        config["server.max_connections"] = most


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
_TOKEN = _Lazy(rb"[%s]+" % _TCHAR)
# request-line = method SP request-target SP HTTP-version ; exactly one SP each
_REQUEST_LINE = _Lazy(r"([%s]+) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])" % _TCHAR.decode())
# field-value = *field-content ; field-vchar = VCHAR / obs-text, SP and HTAB inside
_BAD_VALUE = _Lazy(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = _Lazy(rb"[0-9]{1,18}")          # Content-Length = 1*DIGIT, bounded
# chunk = chunk-size [ chunk-ext ] CRLF ... ; chunk-size = 1*HEXDIG, bounded (RFC 9112 7.1)
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
# chunk-ext-name = token ; chunk-ext-val = token / quoted-string ; BWS = *( SP / HTAB )
# quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE (RFC 9110 5.6.4)
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE = _Lazy(rb"[0-9A-Fa-f]{1,16}(?:[ \t]*;[ \t]*[%s]+(?:[ \t]*=[ \t]*(?:[%s]+|%s))?)*"
                    % (_TCHAR, _TCHAR, _QUOTED))
# Host = uri-host [ ":" port ] ; uri-host = IP-literal / IPv4address / reg-name
_HOST = _Lazy(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]{0,5})?")
_ABSOLUTE = _Lazy(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)")
# The fields of a head in one findall(): CRLF field-name ":" OWS field-value, field-name = token
# minus "_" (see _field).  Values are checked for CTLs by _CTLS, for the whole head at once.
_FIELD_LINE = _Lazy(r"\r\n([%s]+):[\t ]*([^\r]*)" % _TCHAR.decode().replace("_", ""))
_CTLS = bytes(c for c in range(32) if c not in b"\t\r\n") + b"\x7f"


class RequestHead:
    """The request line and header fields, with the framing they imply."""

    query, host, scheme, content_length, chunked, expect_continue = "", None, None, None, False, False
    env = None  # the WSGI environ it gives, less the client's address and wsgi.input: built by the bridge once

    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.path, self.keep_alive = target, version == "HTTP/1.1"

    def __repr__(self):
        return "<RequestHead %s %s %s>" % (self.method, self.target, self.version)


class RequestParser:
    """Turns received bytes into request events; see the section contract."""

    error, in_body = None, False  # in_body: True while the current request's body is not all returned
    _scanned = _remaining = _total = 0

    def __init__(self, config: dict = None, shared: dict = None):
        config = config or make_config()
        self.max_line = config["server.max_request_line_size"]
        self.max_header = config["server.max_request_header_size"]
        self.max_fields = config["server.max_header_count"]
        self.max_body = config["server.max_request_body_size"]
        self.max_ext = config["server.max_chunk_extension_size"]
        self.buffer, self._state = bytearray(), self._head
        # head bytes -> RequestHead: a keep-alive client sends the same head again and again, and
        # one that reconnects for each request (HTTP/1.0, probes) the same as the last: ``shared``
        # is the server's, for heads without credentials (a hit is faster: others must not time it).
        self._heads, self.shared = {}, {} if shared is None else shared

    def receive(self, data: bytes) -> None:
        self.buffer += data

    @property
    def body_left(self):
        """Bytes of a Content-Length body not yet returned; None when chunked."""
        return self._remaining if self._state == self._fixed_body else None

    def took(self, n: int) -> None:
        """The caller received ``n`` (at most body_left) bytes of a Content-Length body itself,
        with nothing buffered: a large upload goes from the socket to its file without two copies."""
        assert not self.buffer and 0 < n <= self.body_left
        self._remaining -= n
        if not self._remaining:
            self._state = self._end

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
        if not buf:
            return NEED_DATA
        # RFC 9112 2.2: "a server that is expecting to receive and parse a
        # request-line SHOULD ignore at least one empty line (CRLF) received
        # prior to the request-line."
        while buf.startswith(b"\r\n"):
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
        head = self._heads.get(block) or self.shared.get(block)
        if head is None:  # same bytes, same limits: the same head, so only a new one is parsed
            head = parse_head(block, self)
            if len(block) <= 4 * KiB:  # bounded: a few small heads per connection, 64 for all
                _remember(self._heads, block, head, 8)
                # Shared only without secrets, whose presence another client could time: no
                # credentials, and no query string (reset links and API keys travel in one).
                low = block.lower()  # a field name is followed by ":" at once, so this finds each
                if b"cookie:" not in low and b"authorization:" not in low and not head.query:
                    _remember(self.shared, block, head, 64)
        if head.chunked or head.content_length:
            self._start_body(head)
        else:
            self._state = self._end
        return head

    def _check_partial(self, buf, start):
        # An incomplete head may end in the first byte of a CRLF (line) or in
        # a CRLF and the first CR of the final CRLF CRLF (fields): not over
        # the limit yet.  Only bytes new since ``start`` are searched, so a
        # client sending one byte per segment costs linear, not quadratic, time.
        first = buf.find(b"\r\n", 0, self.max_line + 2)
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
        else:
            if self.max_body and head.content_length > self.max_body:
                raise ProtocolError(413, "Request body too large.")
            self._remaining = head.content_length
            self._state = self._fixed_body
        self.in_body = True

    # -- bodies ------------------------------------------------------------
    def _end(self, max_bytes):
        self._state, self.in_body = self._head, False
        return END_OF_MESSAGE

    def _take(self, max_bytes, then):
        """Up to ``max_bytes`` of the ``_remaining`` body bytes already buffered."""
        if not self.buffer:
            return NEED_DATA
        n = min(len(self.buffer), self._remaining, max_bytes)
        with memoryview(self.buffer) as view:  # one copy, not a bytearray slice and then bytes
            data = bytes(view[:n])
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
        # Extensions are checked, then ignored: "A recipient MUST ignore
        # unrecognized chunk extensions" (RFC 9112 7.1.1), but not malformed ones.
        if len(line.partition(b";")[2]) > self.max_ext:
            raise ProtocolError(400, "Oversized chunk extension.")
        if not _CHUNK_LINE.fullmatch(line):
            raise ProtocolError(400, "Invalid chunk size or chunk extension.")
        self._remaining = int(line.partition(b";")[0], 16)  # int() allows the BWS before ";"
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
                return self._end(max_bytes)
            self._remaining += len(line) + 2  # counts trailer bytes from here on
            if self._remaining > self.max_header:
                raise ProtocolError(431, "Trailer section too large.")
            _field(line)


def _remember(cache: dict, key, value, size: int) -> None:
    """cache[key] = value in a cache of at most ``size`` entries (emptied when full: no bookkeeping)."""
    if len(cache) >= size:
        cache.clear()
    cache[key] = value


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
    first = block.find(b"\r\n")
    if (len(block) if first < 0 else first) > parser.max_line:
        raise ProtocolError(414, "Request line too long.")
    if first >= 0 and len(block) - first - 2 > parser.max_header:
        raise ProtocolError(431, "Request header fields too large.")
    # One pass each, in C: no CTL, every CR in a CRLF and every LF too; else the lines say why.
    crs = block.count(b"\r")
    if len(block.translate(None, _CTLS)) != len(block) or block.count(b"\n") != crs or block.count(b"\r\n") != crs:
        _refuse_head(block, parser)
    text = block.decode("latin-1")
    head = _request_line(text if first < 0 else text[:first])
    if first >= 0:
        if crs > parser.max_fields:
            raise ProtocolError(431, "Too many header fields.")
        head.headers = _FIELD_LINE.findall(text, first)
        if len(head.headers) != crs:
            _refuse_head(block, parser)  # a line without a valid name: say which rule it breaks
        if b" \r" in block or b"\t\r" in block or block[-1] in b" \t":  # trailing OWS, rare
            head.headers = [(name, value.rstrip(" \t")) for name, value in head.headers]
    _semantics(head)
    return head


def _refuse_head(block: bytes, parser: RequestParser):
    """A head parse_head refused, checked line by line to say why (always raises)."""
    line, _, fields = block.partition(b"\r\n")
    if block.count(b"\n") != block.count(b"\r\n") or block.count(b"\r") != block.count(b"\n"):
        # RFC 9112 2.2: "A sender MUST NOT generate a bare CR ... a recipient
        # of such a bare CR MUST consider that element to be invalid".
        raise ProtocolError(400, "Bare CR or LF in the request head.")
    head = _request_line(line.decode("latin-1"))
    lines = fields.split(b"\r\n") if fields else ()
    if len(lines) > parser.max_fields:
        raise ProtocolError(431, "Too many header fields.")
    head.headers = [_field(field) for field in lines]
    raise ProtocolError(400, "Malformed request head.")  # not reached: parse_head and the lines agree


def _request_line(line: str) -> RequestHead:
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise ProtocolError(400, "Malformed request line.")
    method, target, version = match.groups()
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        raise ProtocolError(505, "HTTP version not supported.")
    head = RequestHead(method, target, version, [])
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
        rest = match.group(3)
        head.path, _, head.query = (rest if rest[:1] == "/" else "/" + rest).partition("?")
    if "#" in target:
        raise ProtocolError(400, "A fragment is not allowed in a request target.")


def _semantics(head):
    """Host, framing (Content-Length / Transfer-Encoding), Connection, Expect."""
    hosts, lengths, codings = [], [], None
    for name, value in head.headers:
        lname = name.lower()
        if lname == "host":
            hosts.append(value)
        elif lname not in {"content-length", "transfer-encoding", "connection", "expect"}:
            pass  # most fields: nothing to check for the framing
        elif lname == "content-length":
            lengths.append(value)
        elif lname == "transfer-encoding":
            # RFC 9110 5.6.1.2: "a recipient MUST parse and ignore a reasonable
            # number of empty list elements" (",chunked", "chunked,").
            codings = (codings or []) + [c.strip(" \t").lower() for c in value.split(",") if c.strip(" \t")]
        elif lname == "connection":
            tokens = {t.strip(" \t").lower() for t in value.split(",")}
            if tokens & {"close", "keep-alive"}:  # close wins
                head.keep_alive = "close" not in tokens
        elif lname == "expect":
            if value.lower() != "100-continue":
                raise ProtocolError(417, "Only 'Expect: 100-continue' is supported.")
            head.expect_continue = head.version == "HTTP/1.1"
    # RFC 9112 3.2: "A server MUST respond with a 400 (Bad Request) status code
    # to any HTTP/1.1 request message that lacks a Host header field and to any
    # request message that contains more than one Host header field line or a
    # Host header field with an invalid field value."
    if len(hosts) == 1:
        if not _HOST.fullmatch(hosts[0]):
            raise ProtocolError(400, "Invalid Host header.")
        if head.host is None:
            head.host = hosts[0]
    elif hosts or head.version == "HTTP/1.1":
        raise ProtocolError(400, "Exactly one Host header is required.")
    if codings is not None:  # present, even if it lists no coding at all
        _transfer_coding(head, codings, lengths)
    elif lengths:
        _content_length(head, lengths)


def _transfer_coding(head, codings, lengths):
    if head.version == "HTTP/1.0":
        raise ProtocolError(400, "Transfer-Encoding is not allowed in HTTP/1.0.")
    if lengths:
        # RFC 9112 6.1: a message with both "ought to be handled as an error";
        # both together are the classic request-smuggling vector.
        raise ProtocolError(400, "Both Content-Length and Transfer-Encoding.")
    if not all(_TOKEN.fullmatch(c.encode("latin-1")) for c in codings):
        raise ProtocolError(400, "Invalid Transfer-Encoding.")
    if codings[-1:] != ["chunked"]:
        # RFC 9112 6.3: "If a Transfer-Encoding header field is present in a
        # request and the chunked transfer coding is not the final encoding, ...
        # the server MUST respond with the 400 (Bad Request) status code and
        # then close the connection."
        raise ProtocolError(400, "The final transfer coding must be chunked.")
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
# small responses in one write.  It reaches the socket only through _Conn's
# recv, send and sendfile.
# ===========================================================================

_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade"))
_STATUS = _Lazy(r"[1-5][0-9][0-9] [\t\x20-\x7e\x80-\xff]*")
_NAME = _Lazy(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = _Lazy(r"[\t\x20-\x7e\x80-\xff]*")
_FIELDS = {}  # (name, value) -> its Content-Length or None, for fields that passed _check_field
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


def _sentence(status: int) -> str:
    """What a status means, in a sentence, for a page that has no message of its own."""
    from http import HTTPStatus
    try:
        return HTTPStatus(status).description.rstrip(".") + "."
    except ValueError:
        return "The server answered with status %d." % status


def error_page(status: int, message: str = None, detail: str = None) -> bytes:
    """A small self-contained HTML page; everything reflected in it is escaped."""
    from html import escape
    title = escape(status_line(status))
    pre = "<pre>%s</pre>" % escape(detail) if detail else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>%s</title><style>body{font:16px/1.5 "
            "system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em;color:#222}h1{font-size:1.4em;"
            "border-bottom:1px solid #ccc}pre{background:#f4f4f4;padding:1em;overflow:auto}</style></head>"
            "<body><h1>%s</h1><p>%s</p>%s</body></html>\n" % (title, title, escape(message or _sentence(status)),
                                                           pre)).encode("utf-8")


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


class _NoBody:
    """wsgi.input of a request without a body: at its end, and stateless, so one serves every thread."""

    read = readline = lambda self, size=-1: b""  # noqa: E731
    readlines = lambda self, hint=-1: []  # noqa: E731
    __iter__ = lambda self: iter(())  # noqa: E731


_NO_BODY = _NoBody()


class _Exchange:
    """One request and its response on a connection."""

    status = headers = length = None
    headers_sent = chunked = bodiless = add_length = False  # add_length: we add Content-Length
    sent = 0

    def __init__(self, server, conn):
        self.server, self.conn, self.head = server, conn, conn.head
        self.no_body, self.close = self.head.method == "HEAD", not self.head.keep_alive
        self.input = _NO_BODY if conn.body is None else conn.body.input()  # read whole by the poll role

    def run(self) -> bool:
        """Serve the request; True if the connection may carry another."""
        environ = self.environ()
        try:
            try:
                result = self.server.app(environ, self.start_response)
                try:
                    self.send_result(result)
                finally:
                    if hasattr(result, "close"):
                        result.close()
            except (_ClientGone, ProtocolError):
                raise
            except BaseException:  # SystemExit or KeyboardInterrupt from a handler too: the server's
                # own stop is a flag, never an exception, so this one request fails, not the worker
                _logger().exception("Error answering %s %s", self.head.method, self.head.target)
                self.fail(500, None)
        except _ClientGone:
            return False
        except ProtocolError as err:
            self.fail(err.status, err.message)
        finally:
            if self.conn.body is not None:
                self.conn.body.close()  # its memory or temporary file
                self.conn.body = None
        if self.server._access:
            if self.conn.out:
                self.conn.out.append((self, environ))  # logged by flush() once all of it went
            else:
                self.log(environ)
        return not self.close

    def fail(self, status: int, message: str):
        """Answer with an error if nothing was sent yet; close either way."""
        self.close = True
        if not self.headers_sent:
            self.headers_sent = True
            self.status = status_line(status)
            self.conn.send(_simple_response(status, message))

    def environ(self) -> dict:
        addr = self.conn.addr or ("", "")
        return {**(self.head.env or self.head_environ()), "REMOTE_ADDR": addr[0], "REMOTE_PORT": str(addr[1]),
                "wsgi.input": self.input}

    def head_environ(self) -> dict:
        """The environ keys this head gives (all but the client's address and wsgi.input), kept on it:
        the parser reuses heads."""
        head, server = self.head, self.server
        if server._env is None:  # the keys that stay the same for every request
            server._env = {"SCRIPT_NAME": "", "SERVER_NAME": server.host, "SERVER_PORT": str(server.port),
                           "wsgi.version": (1, 0), "wsgi.url_scheme": "https" if self.conn.tls else "http",
                           "wsgi.errors": sys.stderr, "wsgi.multithread": True,
                           "wsgi.multiprocess": _MULTIPROCESS, "wsgi.run_once": False,
                           "wsgi.file_wrapper": FileWrapper, "wsgi.input_terminated": True}
        head.env = env = {**server._env, "REQUEST_METHOD": head.method,
                          "PATH_INFO": _unquote(head.path) if "%" in head.path else head.path,
                          "QUERY_STRING": head.query, "SERVER_PROTOCOL": head.version,
                          "REQUEST_URI": head.target, "RAW_URI": head.target}
        for name, value in head.headers:
            key = _ENV_KEYS.get(name) or _env_key(name)
            if key in env:
                env[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
            else:
                env[key] = value
        if head.scheme is not None:
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
        code = int(status[:3])
        self.length = _check_headers(headers)
        self.status, self.headers = status, headers
        # RFC 9110 8.6: "A server MUST NOT send a Content-Length header field in
        # any response with a status code of 1xx (Informational) or 204 (No
        # Content)."  A 304 has no content either: none gets framing added.
        self.bodiless = code in (204, 304) or code < 200
        self.no_body = self.bodiless or self.head.method == "HEAD"
        return self.write

    def send_result(self, result):
        if type(result) is list and len(result) == 1 and type(result[0]) is bytes:
            body = result[0]  # the usual answer of a framework
        elif isinstance(result, (list, tuple)) and all(type(b) is bytes for b in result):
            body = b"".join(result)
        else:
            body = None
        if body is not None:
            if not self.headers_sent and self.length is None and not self.bodiless:
                self.length, self.add_length = len(body), True
            self.write(body) if self.headers_sent else self.send_head(body)  # the whole body, with its head
        elif isinstance(result, FileWrapper) and self.length is not None and not self.headers_sent:
            self.send_head(b"")
            if not self.no_body and self.length:
                offset = result.offset or result.filelike.tell()
                self.sent = self.conn.sendfile(result.filelike, offset, self.length)
                if self.sent < self.length:  # it shrank meanwhile; write_end() closes the connection
                    _logger().warning("%s: the file ended after %d of %d bytes; connection closed",
                                      self.head.target, self.sent, self.length)
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
            self.conn.send(self.frame(data))

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
            if self.length is None and not self.bodiless:
                self.length, self.add_length = 0, True
            self.send_head(b"")
        elif self.chunked:
            self.conn.send(b"0\r\n\r\n")
        if self.length is not None and self.sent < self.length and not self.no_body:
            self.close = True  # the body is shorter than announced: the client must notice

    def send_head(self, first: bytes):
        if self.status is None:
            raise AssertionError("write() before start_response()")
        extra = ""
        if self.add_length:
            extra = "Content-Length: %d\r\n" % self.length
        elif self.length is None and not self.no_body:
            if self.head.version == "HTTP/1.1":
                self.chunked, extra = True, "Transfer-Encoding: chunked\r\n"
            else:
                self.close = True  # HTTP/1.0 without a length: the close ends the body
        if self.server._stopping:
            self.close = True
        if self.close:
            extra += "Connection: close\r\n"
        elif self.head.version == "HTTP/1.0":
            extra += "Connection: keep-alive\r\n"
        fields = "\r\n".join(map(": ".join, self.headers))  # names and values checked already
        head = "HTTP/1.1 %s\r\n%s%s%sDate: %s\r\n\r\n" % (self.status, fields, "\r\n" if fields else "", extra,
                                                          _now_date())
        self.headers_sent = True
        try:
            self.conn.send(head.encode("latin-1") + self.frame(first))
        except _Overflow as exc:
            if exc.args[0]:
                raise
            self.headers_sent, self.sent = False, 0  # none of it went: an answer can still be given
            raise ProtocolError(503, "Too much output is waiting for slow clients; try again later.") from None

    def log(self, environ):
        """A Common Log Format line; the "combined" formatter appends Referer and User-Agent."""
        self.server._access('%s - %s [%s] "%s %s %s" %s %s' % (
            environ["REMOTE_ADDR"] or "-", _log_quoted(environ.get("REMOTE_USER")) or "-",
            time.strftime("%d/%b/%Y:%H:%M:%S %z"), self.head.method, _log_quoted(self.head.target),
            self.head.version, (self.status or "000")[:3], self.sent or "-"),
            extra={"referer": _log_quoted(environ.get("HTTP_REFERER")) or "-",
                   "user_agent": _log_quoted(environ.get("HTTP_USER_AGENT")) or "-"})


_MULTIPROCESS = False  # set in each worker process when there are several


def _log_quoted(text: str) -> str:
    """``text`` safe inside a quoted log field: '"' and '\\' escaped, non-ASCII as \\xhh."""
    if not text:
        return text
    return text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "backslashreplace").decode("ascii")


def _check_headers(headers) -> int:
    """Validate response header fields; returns the Content-Length or None."""
    checked = _local.checked
    if checked is not None and checked[0] is headers:
        _local.checked = None
        return checked[1]  # an Application's own fields, checked by Response.set_fields
    if type(headers) is not list:
        raise TypeError("response headers must be a list of (name, value) tuples")
    length = None
    for item in headers:
        try:
            known = _FIELDS[item]  # a field checked before: what it says about the length
        except (KeyError, TypeError):  # TypeError: unhashable, so no tuple: refused below
            known = _check_field(item)
        length = length if known is None else known
    return length


def _check_field(item):
    """One response field, checked; returns its Content-Length or None (remembered: bounded)."""
    if type(item) is not tuple or len(item) != 2:
        raise TypeError("response header %r is not a (name, value) tuple" % (item,))
    name, value = item
    if type(name) is not str or not _NAME.fullmatch(name):
        raise ValueError("invalid response header name %r" % (name,))
    if type(value) is not str or not _VALUE.fullmatch(value):
        raise ValueError("invalid value for response header %s: %r" % (name, value))
    lname, length = name.lower(), None
    if lname in _HOP_BY_HOP:
        raise ValueError("hop-by-hop header %r is the server's business" % (name,))
    if lname == "content-length":
        if not value.isdigit() or not value.isascii():
            raise ValueError("invalid Content-Length %r" % (value,))
        length = int(value)
    if lname != "set-cookie":  # a session id has no business in a process-wide table
        _remember(_FIELDS, item, length, 1000)
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


_local = type("_Local", (_thread._local,), {"checked": None})()  # a default: reading .checked never raises


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
        self.names = {}
        if items:
            self.update(items)

    def __setitem__(self, name, value):
        value = str(value)
        if not _NAME.fullmatch(name):
            raise ValueError("invalid header name %r" % (name,))
        if not _VALUE.fullmatch(value):
            raise ValueError("header %s: value %r has CR, LF, NUL or another control character" % (name, value))
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

    def default(self, name: str, value: str) -> None:
        """Set ``name`` unless present; for minipub's own constant fields (not validated again)."""
        key = name.lower()
        if key not in self.names:
            dict.__setitem__(self, key, value)
            self.names[key] = name

    def update(self, other=(), **more):
        for name, value in [*(other.items() if isinstance(other, dict) else other), *more.items()]:
            self[name] = value

    def fields(self) -> list:
        """[(name as first written, value)] for start_response."""
        return [(self.names[k], v) for k, v in self.items()]


def _request_headers(environ) -> HeaderDict:
    headers = HeaderDict()
    for key, value in environ.items():
        if key.startswith("HTTP_") or (key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value):
            name = (key[5:] if key.startswith("HTTP_") else key).replace("_", "-")
            dict.__setitem__(headers, name.lower(), value)
            headers.names[name.lower()] = name.title()
    return headers


class Request:
    """What the client asked: minipub.request while a handler runs.

    ``config`` is the merged, read-only configuration of this request's path, ``app`` the
    mounted Application, ``handler`` what the dispatcher found (a tool may replace it, or set
    it to None when it answered itself), ``params`` the query and form parameters."""

    handler, is_index, json, login = None, False, None, None
    process_request_body = True

    def __init__(self, environ, app):
        self.environ, self.app, self.params, self.hooks = environ, app, {}, _NO_HOOKS
        self.method, self.query_string = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        self.script_name, self.path_info = environ.get("SCRIPT_NAME", ""), _utf8(environ.get("PATH_INFO", ""))
        base = app.config
        self.config, self.show_tracebacks = base, base["request.show_tracebacks"]
        if base["server.trusted_proxies"]:
            _apply_forwarded(self, base["server.trusted_proxies"])

    # What a handler may never look at is worked out when it does (a proxy tool may set them).
    @cached_property
    def path(self) -> str:
        return self.script_name + self.path_info

    @cached_property
    def remote_addr(self) -> str:
        return self.environ.get("REMOTE_ADDR", "")

    @cached_property
    def scheme(self) -> str:
        return self.environ.get("wsgi.url_scheme", "http")

    @cached_property
    def host(self) -> str:
        env = self.environ
        return env.get("HTTP_HOST") or "%s:%s" % (env.get("SERVER_NAME", "localhost"), env.get("SERVER_PORT", "80"))

    @cached_property
    def body(self):
        """The request body, a stream (``wsgi.input``)."""
        return self.environ["wsgi.input"]

    @property
    def base(self) -> str:
        return "%s://%s" % (self.scheme, self.host)

    @property
    def url(self) -> str:
        return self.base + _quote_path(self.path) + ("?" + self.query_string if self.query_string else "")

    @property
    def wsgi_environ(self) -> dict:  # CherryPy's name
        return self.environ

    @cached_property
    def remote(self):
        """CherryPy's request.remote: ip, port and name of the client."""
        from types import SimpleNamespace
        return SimpleNamespace(ip=self.remote_addr, port=int(self.environ.get("REMOTE_PORT") or 0),
                               name=self.remote_addr)

    @cached_property
    def headers(self) -> HeaderDict:
        return _request_headers(self.environ)

    @cached_property
    def cookies(self) -> dict:
        return _parse_cookies(self.environ.get("HTTP_COOKIE", ""))

    @cached_property
    def cookie(self):
        """CherryPy's request.cookie, an http.cookies.SimpleCookie of what the client sent."""
        from http.cookies import SimpleCookie
        jar = SimpleCookie()
        for name, value in self.cookies.items():
            try:
                jar[name] = value
            except Exception:  # http.cookies.CookieError: a name SimpleCookie refuses
                pass
        return jar


def _utf8(text: str) -> str:
    """PEP 3333 hands paths over as latin-1; browsers send UTF-8."""
    if text.isascii():
        return text
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
    """From a trusted proxy only, Forwarded (RFC 7239) or else X-Forwarded-For,
    -Proto and -Host set remote_addr, scheme and host (so base and redirects
    name the public URL).  From anyone else they are ignored."""
    addr, proto, host = _forwarded_hop(req.environ, trusted)
    req.remote_addr, req.scheme, req.host = addr or req.remote_addr, proto or req.scheme, host or req.host


_network_cache = {}


def _trusted_networks(entries) -> tuple:
    """server.trusted_proxies parsed once per distinct value; ConfigError if bad."""
    networks = _network_cache.get(entries)
    if networks is None:
        import ipaddress
        try:
            networks = tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries)
        except ValueError as exc:
            raise ConfigError("server.trusted_proxies: %s" % exc) from None
        _remember(_network_cache, entries, networks, 64)
    return networks


def _is_trusted(addr: str, networks) -> bool:
    import ipaddress
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False  # 'unknown', an obfuscated node, or garbage
    ip = getattr(ip, "ipv4_mapped", None) or ip  # a dual-stack socket reports ::ffff:a.b.c.d
    return any(ip in net for net in networks)


# forwarded-pair = token "=" value ; value = token / quoted-string (RFC 7239 4)
_FORWARDED_PAIR = _Lazy(r'[ \t]*(?:([%s]+)=([%s]+|"(?:[^"\\]|\\.)*"))?[ \t]*([;,]|$)'
                             % ((_TCHAR.decode("ascii"),) * 2))


def _forwarded_elements(value: str) -> list:
    """'for=a;proto=https, for=b' -> [{'for': 'a', 'proto': 'https'}, {'for': 'b'}]."""
    elements, current, pos = [], {}, 0
    while True:
        match = _FORWARDED_PAIR.match(value, pos)
        if match is None:
            raise ValueError("malformed Forwarded header %r" % value)
        name, text, sep = match.groups()
        if name:
            name = name.lower()
            if name in current:
                # RFC 7239 4: "Each parameter MUST NOT occur more than once per forwarded-element."
                raise ValueError("repeated %r in Forwarded header %r" % (name, value))
            current[name] = re.sub(r"\\(.)", r"\1", text[1:-1]) if text[0] == '"' else text
        if sep != ";":
            elements.append(current)
            current = {}
        if not sep:
            return elements
        pos = match.end()


def _forwarded_hop(environ, trusted) -> tuple:
    """(client, proto, host) as told by the outermost of the ``trusted`` proxies; Nones if unknown,
    or if the peer is not one of them.

    The client is the rightmost address that is not itself a trusted proxy:
    anything left of it the client may have written.  Malformed headers from
    a trusted proxy are logged and ignored (the peer stays the client)."""
    networks = _trusted_networks(trusted)
    if not _is_trusted(environ.get("REMOTE_ADDR", ""), networks):
        return None, None, None
    try:
        if "HTTP_FORWARDED" in environ:
            elements = _forwarded_elements(environ["HTTP_FORWARDED"])
            addrs = [_node_ip(e.get("for", "")) for e in elements]
        else:
            addrs = [a.strip(" \t") for a in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")]
            last = {k: environ.get("HTTP_X_FORWARDED_" + k.upper(), "").rpartition(",")[2].strip(" \t")
                    for k in ("proto", "host")}
        i = len(addrs) - 1
        while i > 0 and _is_trusted(addrs[i], networks):
            i -= 1
        found = elements[i] if "HTTP_FORWARDED" in environ else last
        addr, proto, host = addrs[i], found.get("proto") or None, found.get("host") or None
        proto = proto and proto.lower()
        if proto not in (None, "http", "https") or (host is not None and not _HOST.fullmatch(host)):
            raise ValueError("forwarded proto %r or host %r is invalid" % (proto, host))
        return addr or None, proto, host or None
    except ValueError as exc:
        _logger().warning("ignored proxy headers from %s: %s", environ.get("REMOTE_ADDR"), exc)
        return None, None, None


def _node_ip(node: str) -> str:
    """RFC 7239 6: node = nodename [ ":" node-port ]; an IPv6 nodename is bracketed."""
    return node[1:node.find("]")] if node.startswith("[") else node.partition(":")[0]


class Response:
    """What the handler answers: minipub.response while a handler runs.  ``body`` holds the
    handler's return value until the response is finalized (tools may change it)."""

    def __init__(self):
        self.status, self._headers, self.cookies = 200, HeaderDict(), []
        self.extra_fields, self.body = [], None  # extra_fields: repeatable fields a HeaderDict cannot hold

    @property
    def headers(self) -> HeaderDict:
        return self._headers

    @headers.setter
    def headers(self, value):
        self._headers = value if isinstance(value, HeaderDict) else HeaderDict(value)

    @cached_property
    def cookie(self):
        """CherryPy's response.cookie: a SimpleCookie whose morsels become Set-Cookie fields."""
        from http.cookies import SimpleCookie
        return SimpleCookie()

    def set_fields(self) -> list:
        """Every header field to send, Set-Cookie included, checked here once: start_response
        then trusts them (they were validated as they were set)."""
        headers = self._headers
        if not _HOP_BY_HOP.isdisjoint(headers):
            raise ValueError("hop-by-hop header %r is the server's business" % sorted(_HOP_BY_HOP & set(headers))[0])
        fields = headers.fields()
        if self.extra_fields or self.cookies:
            fields += self.extra_fields + [("Set-Cookie", c) for c in self.cookies]
        if "cookie" in self.__dict__:  # SimpleCookie output: checked like any field
            fields += [("Set-Cookie", HeaderDict([("Set-Cookie", m.OutputString())])["Set-Cookie"])
                       for m in self.cookie.values()]
        length = dict.get(headers, "content-length")
        if length is not None and not (length.isdigit() and length.isascii()):
            raise ValueError("invalid Content-Length %r" % (length,))
        # PEP 3333 wants a plain list, so the mark that it was checked is kept beside it.
        _local.checked = (fields, None if length is None else int(length))
        return fields

    def set_cookie(self, name: str, value: str, max_age: int = None, path: str = "/",
                   domain: str = None, secure: bool = None, httponly: bool = True, samesite: str = "Lax") -> None:
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
    """A PEP 3333 application serving the object tree under ``root``.

    ``config`` is a dict or an INI file's path: its flat keys and ``global`` section are this
    application's defaults over ``minipub.config``; ``"/path"`` sections apply to that path and
    below, the deepest winning; ``_cp_config`` on the tree's objects comes last (class, then
    instance, then handler).  What depends only on the route (the merged configuration and the
    hooks of the tools that are on) is worked out at its first request and cached."""

    def __init__(self, root, config=None, script_name: str = ""):
        self.root, self.script_name = root, script_name.rstrip("/")
        flat, sections = _read_sections(config)
        self.own = _checked(flat)
        self.sections = {path: _checked(keys, "[%s]" % path) for path, keys in sections.items()}
        self._paths = sorted(self.sections, key=lambda p: (p != "/", p.count("/"), p))  # shallow first
        self._plans, self._routes, self._version, self._base = {}, {}, None, None
        _trusted_networks(self.config["server.trusted_proxies"])  # a bad entry fails here, not per request
        for path in self._paths:
            self._check_static(path)
        self.answers = _check_tree(root)

    @property
    def config(self) -> dict:
        """minipub.config updated with this application's own global keys."""
        if self._version != config.version:  # minipub.config changed: merge again, once
            base = dict(config)
            base.update(self.own)
            self._base, self._version = base, config.version
            self._plans.clear()
            self._routes.clear()
        return self._base

    def __call__(self, environ, start_response):
        if self.script_name and not _mount(environ, self.script_name):
            start_response("404 Not Found", list(_ERROR_HEADERS))
            return [error_page(404)]
        return self.serve(environ, start_response)

    def serve(self, environ, start_response):
        """Answer a request whose SCRIPT_NAME already names this application's mount point."""
        req, resp = Request(environ, self), Response()
        _local.request, _local.response = req, resp
        body = self.answer(req, resp)
        if "_uploads" in req.__dict__:  # temporary files live until the body is sent
            body = _release_uploads(req, body)
        if "on_end_request" in req.hooks:
            body = _on_close(body, lambda: _run_safely(req, "on_end_request"))
        if req.login is not None:
            environ["REMOTE_USER"] = req.login
        status = resp.status if isinstance(resp.status, str) else status_line(int(resp.status))
        start_response(status, resp.set_fields())
        return body

    def answer(self, req, resp):
        """The WSGI body, after the handler or an error; on_end_resource hooks run either way."""
        try:
            try:
                return self.respond(req, resp)
            except HTTPRedirect as redirect:
                self.redirect(req, resp, redirect)
            except HTTPError as err:
                detail = None
                if req.show_tracebacks:  # as CherryPy: where it was raised helps while developing
                    import traceback
                    detail = traceback.format_exc()
                self.error(req, resp, err.status, err.message, err.headers, detail)
            # As CherryPy: a redirect or error page is finalized too (a session is saved on a redirect).
            _run_safely(req, "before_finalize")
            return resp.body
        except _ClientGone:
            raise  # the server's business (close), not a handler bug
        except Exception:
            return self.fail(req, resp)
        finally:
            if "on_end_resource" in req.hooks:
                _run_safely(req, "on_end_resource")

    def respond(self, req, resp):
        root = self.root
        resolve = getattr(root, "_minipub_resolve", None)
        if resolve is not None:  # VirtualHost picks the tree by host
            root = resolve(req)
        key = (id(root), req.path_info, req.method)
        route = self._routes.get(key)
        if route is None:
            route = self._route(root, req.path_info, req.method)
            if route[5] is not None and len(self._routes) < 4096:  # bounded; a 404 is never kept
                self._routes[key] = route
        method, args, req.is_index, allowed, plan, handler, bare = route
        req.config, req.hooks, req.show_tracebacks = plan.config, plan.hooks, plan.tracebacks
        if plan.allow and allowed:  # request.dispatch = MethodDispatcher(): Allow on every answer
            resp.headers["Allow"] = ", ".join(allowed)
        req.handler = method or _refusal(handler, req.method, allowed)
        hooks = plan.hooks
        if hooks:
            _run(hooks, "on_start_resource")
            _run(hooks, "before_request_body")
        query = _form_dict(req.query_string, 1000, 400, "Too many query parameters.", "strict") \
            if req.query_string else {}
        body = req.process_request_body and "CONTENT_TYPE" in req.environ and _body_params(req)
        # query then body parameters; a name given more than once gets the list of its values
        req.params = _pairs_to_dict(_form_items(query) + _form_items(body)) if body else query
        if hooks:
            _run(hooks, "before_handler")
        if req.handler is method and method is not None:
            resp.body = method() if bare and not req.params else method(*args, **_bind(method, args, query,
                                                                                          req.params))
        elif req.handler is not None:
            resp.body = req.handler()
        if hooks:
            _run(hooks, "before_finalize")
        return _body_of(resp.body, resp)

    def _route(self, root, path, verb):
        """What answers ``verb`` on ``path``, worked out once per path: the tree is walked at the
        first request (objects added under a path already answered by a ``default`` are not seen)."""
        handler, args, trail, is_index = find_handler(root, path)
        method, allowed = _method_handler(handler, verb)
        plan = self._plan(path, trail, handler, method, is_index)
        bare = method is not None and not args and not _spec(method)[1]  # takes nothing: call it so
        return method, tuple(args), is_index, allowed, plan, handler, bare

    def _plan(self, path, trail, handler, method, is_index):
        """The cached _Plan of this route: its sections, the walked nodes, handler and method."""
        sections = () if not self._paths else tuple(
            p for p in self._paths if p == "/" or path == p or path.startswith(p + "/"))
        route = (handler is not None and is_index, path[-1:] == "/")
        key = (sections, route, id(getattr(handler, "__func__", handler)),
               id(getattr(method, "__func__", method))) + tuple(map(id, trail))
        plan = self._plans.get(key)
        if plan is None:
            walked = trail if handler is None or handler is trail[-1] else trail + [handler]
            if method is not None and method is not handler:
                walked = walked + [method]
            plan = _Plan(self, sections, walked, route)
            _remember(self._plans, key, plan, 4096)  # bounded: a default handler takes any path
        return plan

    def _check_static(self, path):
        keys = self.sections[path]
        if "tools.staticdir.dir" in keys:
            root = next((self.sections[p].get("tools.staticdir.root") for p in reversed(self._paths)
                         if (p == "/" or path.startswith(p)) and "tools.staticdir.root" in self.sections[p]),
                        self.config.get("tools.staticdir.root"))
            _static_root(keys["tools.staticdir.dir"], root, "[%s]" % path)

    def redirect(self, req, resp, redirect):
        location = absolute_url(req, redirect.url)
        resp.status = redirect.status
        resp.headers = HeaderDict([("Location", location)] + _ERROR_HEADERS)
        from html import escape
        req.failed = True
        resp.body = [('<!DOCTYPE html>\n<p>This resource is at <a href="%s">%s</a>.</p>\n'
                      % (escape(location), escape(location))).encode("utf-8")]

    def error(self, req, resp, status, message=None, headers=None, detail=None):
        """Make the response an error page: error_page.CODE (a file or a callable), JSON for a
        client that wants it, else minipub's page.  Cookies are kept (a 404 keeps a session)."""
        req.failed = True
        resp.status, resp.headers, resp.extra_fields = status, HeaderDict(_ERROR_HEADERS), []
        for name, value in headers or ():
            if name in resp.headers:  # a repeated field, e.g. one WWW-Authenticate per challenge
                resp.extra_fields.append((name, str(HeaderDict([(name, value)])[name])))
            else:
                resp.headers[name] = value
        resp.body = [_error_body(req, resp, status, message, detail)]

    def fail(self, req, resp):
        """An unexpected exception: logged, then request.error_response or a 500 page."""
        _logger().exception("Error in handler for %s %s", req.method, req.path)
        import traceback
        detail = traceback.format_exc() if req.show_tracebacks else None
        try:
            _run(req.hooks, "before_error_response")
            custom = req.config.get("request.error_response")
            if custom is not None:
                resp.status, resp.body = 500, None
                custom()  # e.g. HTTPError(503).set_response, as CherryPy's default is
                if not req.__dict__.get("failed"):
                    resp.body = _body_of(resp.body, resp)
            else:
                self.error(req, resp, 500, None, None, detail)
            _run(req.hooks, "after_error_response")
        except Exception:  # the error handling itself failed: the plain page, never a loop
            _logger().exception("Error while answering an error for %s", req.path)
            self.error(req, resp, 500)
        return resp.body


class _Plan:
    """What depends only on a route: the merged configuration and the hooks that are on."""

    __slots__ = ("config", "hooks", "tracebacks", "allow", "pinned")

    def __init__(self, app, sections, walked, route):
        from types import MappingProxyType
        merged = dict(app.config)
        for path in sections:
            merged.update(app.sections[path])
        for node in walked:
            for own in _cp_configs(node):
                merged.update(_checked(own, "_cp_config of %s" % _name_of(node)))
        self.config = MappingProxyType(merged)  # shared by the route's requests: read-only
        self.hooks = _hooks_of(merged, route)
        self.tracebacks = merged["request.show_tracebacks"]
        self.allow = isinstance(merged.get("request.dispatch"), MethodDispatcher)
        self.pinned = walked  # keeps the ids in the cache key from being reused


_NO_HOOKS = {}


def _cp_configs(node) -> list:
    """The _cp_config dicts of one walked node: its class's, then its own (instance or function)."""
    found = []
    cls_conf = getattr(type(node), "_cp_config", None) if not callable(node) or isinstance(node, type) else None
    own = getattr(node, "_cp_config", None)
    for conf in (cls_conf, own):
        if isinstance(conf, dict) and conf and not any(conf is f for f in found):
            found.append(conf)
    return found


def _name_of(node) -> str:
    return getattr(node, "__qualname__", None) or type(node).__qualname__


def _check_tree(root, limit: int = 2000) -> bool:
    """Check every _cp_config reachable from ``root`` now, so a typo fails at startup; whether
    anything in the tree answers (an exposed handler or a VirtualHost).  Attributes are read from
    the __dict__s of the object and its classes (not inspect: +0.8 MB), so no property runs."""
    seen, todo, answers = set(), [root], False
    while todo and len(seen) < limit:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        answers = answers or _exposed(node) or hasattr(node, "_minipub_resolve")
        for conf in _cp_configs(node):
            _checked(conf, "_cp_config of %s" % _name_of(node))
        names = {}
        for klass in reversed(type(node).__mro__[:-1]):
            names.update(vars(klass))
        names.update(getattr(node, "__dict__", {}))
        for name, child in names.items():
            if name.startswith("_") or isinstance(child, (str, bytes, int, float, dict, list, tuple)):
                continue
            if callable(child) and not isinstance(child, type) and not hasattr(child, "__dict__"):
                continue
            if getattr(child, "exposed", False) or hasattr(child, "_cp_config") or (
                    not callable(child) and hasattr(child, "__dict__") and type(child).__module__ != "builtins"):
                todo.append(child)
    return answers


def _run(hooks, point):
    for hook in hooks.get(point, ()):
        hook()


def _run_safely(req, point):
    """Hooks after the answer is decided: a failure is logged, and the answer stands."""
    try:
        _run(req.hooks, point)
    except (HTTPError, HTTPRedirect) as exc:
        _logger().error("%s hook for %s raised %r after the answer was decided", point, req.path, exc)
    except Exception:
        _logger().exception("Error in a %s hook for %s", point, req.path)


def _mount(environ, script_name) -> bool:
    path = environ.get("PATH_INFO", "")
    if path != script_name and not path.startswith(script_name + "/"):
        return False
    environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + script_name
    environ["PATH_INFO"] = path[len(script_name):]
    return True


def absolute_url(req, url: str) -> str:
    """``url`` resolved against the request; '//host' and '/\\host' count as external."""
    from urllib.parse import quote, urljoin
    # Non-ASCII (e.g. '/日本') is percent-encoded as UTF-8; CR, LF and other
    # controls are left as they are, so the header check refuses them loudly.
    url = quote(url, safe="".join(map(chr, range(0x80))))
    if url[:2].replace("\\", "/") == "//":
        # Browsers read '/\host' as '//host'; treat both as the other host they
        # name, so what the server checks is what the browser follows.
        return "%s://%s" % (req.scheme, url.replace("\\", "/").lstrip("/"))
    return urljoin(req.base + _quote_path(req.path), url)


def url(path: str = "", qs="", script_name: str = None, base: str = None, relative=None) -> str:
    """The URL of ``path`` in the current application: a path starting with '/' is under the
    mount point (an app mounted at /admin redirecting to url("/") stays under /admin/), another
    is relative to the current path; ``qs`` a string or a dict.  Absolute unless ``relative``
    (True: relative to the current URL, "server": from the host on)."""
    import posixpath
    from urllib.parse import urlencode
    req = _local.request
    if not isinstance(qs, str):
        qs = urlencode(qs, doseq=True)
    script_name = req.script_name if script_name is None else script_name.rstrip("/")
    if not path:
        path, qs = req.path_info, qs or req.query_string
    elif not path.startswith("/"):
        here = req.path_info if req.path_info.endswith("/") else posixpath.dirname(req.path_info) + "/"
        path = here + path
    full = _quote_path(posixpath.normpath(script_name + path) + ("/" if path.endswith("/") else ""))
    full = full.replace("//", "/") + ("?" + qs if qs else "")
    if relative == "server":
        return full
    if relative:
        here = posixpath.dirname(req.path) or "/"
        rel = posixpath.relpath(full.partition("?")[0], here)
        return rel + ("/" if full.partition("?")[0].endswith("/") and rel != "." else "") + (
            "?" + qs if qs else "")
    return (base or req.base).rstrip("/") + full


_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_TO_NAME = str.maketrans(_PUNCTUATION, "_" * len(_PUNCTUATION))


def _exposed(obj) -> bool:
    return getattr(obj, "exposed", False) is True


def find_handler(root, path: str):
    """Walk ``path`` from ``root``: (handler or None, positional args, nodes walked, is_index)."""
    segments = path.split("/")
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
        found = _candidate(trail[depth], segments[depth:], depth)
        if found is not None:
            handler, args, is_index = found
            return handler, args, trail[:depth + 1], is_index
    return None, [], trail, False


def _candidate(node, rest, depth):
    if not rest:
        if _exposed(node) and callable(node):
            return node, [], False
        index = getattr(node, "index", None)
        if _exposed(index):
            return index, [], depth > 0  # the root's index needs no slash added
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
    """(the callable that answers ``method``, the methods allowed): a resource exposed as a class
    answers through its GET, POST, ... methods; None when it has none for ``method``."""
    if handler is None or callable(handler):
        return handler, None
    allowed = [m for m in _METHODS if hasattr(handler, m)]
    if "GET" in allowed and "HEAD" not in allowed:
        allowed.insert(1, "HEAD")
    found = getattr(handler, method, None)
    if found is None and method == "HEAD":
        found = getattr(handler, "GET", None)
    return found, allowed


def _refusal(handler, method, allowed):
    """The handler of a request nothing answers: 404, or 405 for a resource without ``method``."""
    def refuse():
        if handler is None:
            raise NotFound()
        raise HTTPError(405, "%s is not allowed here." % method, [("Allow", ", ".join(allowed))])
    return refuse


class Dispatcher:
    """``request.dispatch``: CherryPy's default dispatcher, walking the object tree."""

    def __repr__(self):
        return "%s()" % type(self).__name__


class MethodDispatcher(Dispatcher):
    """``request.dispatch = minipub.dispatch.MethodDispatcher()``: a subtree of resources answering
    through GET, POST, ... methods, with Allow on every answer."""


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
        spec = (names, required, frozenset(names + kwonly), bool(code.co_flags & 4), bool(code.co_flags & 8))
    _remember(_specs, func, spec, 10000)
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
            any(p.kind == kinds.VAR_POSITIONAL for p in params), any(p.kind == kinds.VAR_KEYWORD for p in params))


def _bind(handler, args, query, params) -> dict:
    """The keyword arguments for ``handler``; NotFound or 400 if they do not fit."""
    positional, required, names, varargs, varkw = _spec(handler)
    if len(args) > len(positional) and not varargs:
        _mismatch(NotFound, "Unexpected path segments: %s", args[len(positional):])
    taken = positional[:len(args)]
    twice = [name for name in params if name in taken]
    if twice:
        _mismatch(NotFound, "Multiple values for parameters: %s", twice)
    unexpected = [name for name in params if name not in names] if not varkw else ()
    if unexpected:
        # CherryPy's rule: a handler without **kwargs is not this URL with other parameters
        # (a cache buster or utm_* included); a stray *form* field is the client's mistake, 400.
        in_query = [name for name in unexpected if name in query]
        if in_query:
            _mismatch(NotFound, "Unexpected query string parameters: %s", in_query)
        _mismatch(lambda m: HTTPError(400, m), "Unexpected body parameters: %s", unexpected)
    missing = [n for n in required if n not in taken and n not in params]
    if missing:
        _mismatch(NotFound, "Missing parameters: %s", missing)
    return params


def _mismatch(error, text: str, names) -> None:
    message = text % ", ".join(map(str, names))
    _logger().debug("%s %s: %s", request.method, request.path, message)
    raise error(message)


def _form_items(fields) -> list:
    """[(name, value)] from a dict or pairs; a list value gives one item per element."""
    items = fields.items() if isinstance(fields, dict) else fields or ()
    return [(name, v) for name, value in items for v in (value if isinstance(value, list) else [value])]


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


def _form_dict(text: str, max_fields: int, status: int, message: str, errors: str = "replace") -> dict:
    from urllib.parse import parse_qsl
    try:
        return _pairs_to_dict(parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields,
                                        errors=errors))
    except UnicodeDecodeError:
        # As CherryPy: a query string that is not UTF-8 names another URL.
        raise NotFound("The query string is not UTF-8.") from None
    except ValueError:
        raise HTTPError(status, message) from None


def _body_params(req) -> dict:
    ctype = req.environ.get("CONTENT_TYPE")
    kind = ctype and ctype.partition(";")[0].strip(" \t").lower()
    if not kind:
        return {}
    length, cap = req.environ.get("CONTENT_LENGTH"), req.config["server.max_request_body_size"]
    if cap and length and length.isdigit() and int(length) > cap:  # lowered for this path
        raise HTTPError(413, "Request body too large for this address.")
    if kind == "application/x-www-form-urlencoded":
        limit = req.config["request.max_form_field_size"]
        data = req.body.read(limit + 1)
        if len(data) > limit:
            raise HTTPError(413, "Form body too large.")
        parts = req.config["request.max_form_parts"]
        return _form_dict(data.decode("utf-8", "replace"), parts, 413, "Too many form fields.")
    if kind == "multipart/form-data":
        return parse_multipart(req, ctype)
    return {}


def _body_of(result, resp):
    """A handler's return value as a WSGI body, with a Content-Type by default.

    The rule: str is UTF-8 text (text/html), bytes are octets; a dict or a list is JSON; a tuple,
    a generator or any other iterable is streamed chunk by chunk (str as UTF-8, bytes as they
    are); a file object, binary or text, is sent as a file (its type guessed from its name)."""
    headers = resp.headers
    code = resp.status if isinstance(resp.status, int) else int(str(resp.status)[:3])
    if code in (204, 304) or code < 200:
        return []  # RFC 9110 15.3.5 / 15.4.5: no content, so no Content-Type either
    if result is None or isinstance(result, str):
        ctype = dict.get(headers, "content-type")
        if ctype is None:
            headers.default("Content-Type", "text/html; charset=utf-8")
        elif ctype.startswith("text/") and "charset" not in ctype:  # we encode it: say how, as CherryPy does
            headers["Content-Type"] = ctype + "; charset=utf-8"
        return [result.encode("utf-8")] if result else []
    if isinstance(result, bytes):
        headers.default("Content-Type", "application/octet-stream")
        return [result]
    if isinstance(result, (dict, list)):
        headers.default("Content-Type", "application/json")
        return [_json_bytes(result)]
    if isinstance(result, FileWrapper):  # serve_file(): headers already set
        return result
    if hasattr(result, "read"):
        return _file_body(result, headers)
    headers.default("Content-Type", "text/html; charset=utf-8")
    return (chunk.encode("utf-8") if isinstance(chunk, str) else chunk for chunk in result)


def _json_bytes(value) -> bytes:
    import json
    try:
        return json.dumps(value).encode("utf-8")
    except TypeError as exc:
        raise TypeError("%s: a returned dict or list is sent as JSON; return a tuple or a generator to "
                        "stream str/bytes chunks instead" % exc) from None


def _file_body(file, headers):
    """A returned file object: a text-mode one is sent through its binary buffer."""
    name = getattr(file, "name", None)
    if "b" not in str(getattr(file, "mode", "b")) and hasattr(file, "buffer"):
        file = file.buffer  # open("index.html") as the docs' tutorial returns it
    headers.setdefault("Content-Type", _content_type(name) if isinstance(name, str) else "application/octet-stream")
    try:
        headers.setdefault("Content-Length", os.fstat(file.fileno()).st_size - file.tell())
    except (AttributeError, OSError, ValueError):
        pass  # not a real file: streamed with chunked framing
    return FileWrapper(file)


def _error_body(req, resp, status: int, message, detail) -> bytes:
    """error_page.CODE / error_page.default, JSON for a client that wants JSON, else minipub's page."""
    conf = req.config
    if _wants_json(req):
        resp.headers["Content-Type"] = "application/json"
        fields = {"status": status, "message": message or _sentence(status)}
        if detail:
            fields["traceback"] = detail
        return _json_bytes(fields)
    custom = conf.get("error_page.%d" % status) or conf.get("error_page.default")
    if custom is None:
        return error_page(status, message, detail)
    from html import escape
    fields = {"status": status_line(status), "message": escape(message or _sentence(status)),
              "traceback": escape(detail or ""), "version": escape(__version__)}
    try:
        if callable(custom):
            page = custom(**fields)
        else:
            with open(custom, encoding="utf-8") as file:
                page = file.read() % fields
        return page.encode("utf-8") if isinstance(page, str) else bytes(page)
    except Exception:  # a broken error page must not hide the error it reports
        _logger().exception("error_page for %d failed; sending the default page", status)
        return error_page(status, message, detail)


def _accept_q(header: str, media: str) -> float:
    """The quality ``header`` (an Accept field) gives ``media``: the most specific range wins."""
    best, q_best = -1, 0.0
    kind = media.partition("/")[0]
    for item in header.split(","):
        rng, _, params = item.strip(" \t").partition(";")
        rng = rng.strip(" \t").lower()
        rank = 2 if rng == media else 1 if rng == kind + "/*" else 0 if rng == "*/*" else -1
        if rank > best:
            best, q_best = rank, _qvalue(params)
    return q_best


def _qvalue(params: str) -> float:
    """The weight (``q=``) among the ';'-separated parameters of one Accept or Accept-Encoding
    entry: 1 without one, 0 for one that is not a number (RFC 9110 12.4.2)."""
    q = 1.0
    for param in params.split(";"):
        name, _, value = param.strip(" \t").partition("=")
        if name.lower() == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
    return q


def _wants_json(req) -> bool:
    """JSON errors for json_out handlers and for clients that take JSON but not HTML."""
    if req.config.get("tools.json_out.on"):
        return True
    accept = req.environ.get("HTTP_ACCEPT", "")
    return "json" in accept and _accept_q(accept, "application/json") > 0 and \
        _accept_q(accept, "text/html") == 0


# -- virtual hosts --------------------------------------------------------------

class VirtualHost:
    """A root that picks another root by the request's host.

    ``domains`` maps ``"name"`` or ``"name:port"`` to a root, or to ``(root, certfile[, keyfile[,
    chainfile]])`` to serve that name its own certificate, chosen by SNI.  Names ignore case and a
    trailing dot; a Host without a port means the scheme's default port; a key without a port
    matches any port.  Unknown hosts go to ``default``, else 400; there is no path prefix.
    X-Forwarded-Host (or Forwarded host=) counts only with ``use_x_forwarded_host=True`` and from
    a peer in ``trusted_proxies`` (default: server.trusted_proxies): trusting it from anyone would
    let any client pick any tree.
    """

    def __init__(self, default=None, domains: dict = None, use_x_forwarded_host: bool = False,
                 trusted_proxies=None):
        self.default, self.use_x_forwarded_host = default, use_x_forwarded_host
        self.trusted_proxies = None if trusted_proxies is None else tuple(trusted_proxies)
        _trusted_networks(self.trusted_proxies or ())  # a bad entry fails now, not per request
        self.domains, self.certificates = {}, {}
        for key, root in (domains or {}).items():
            name, port = _split_host(key)
            if isinstance(root, tuple):
                root, files = root[0], root[1:]
                if not 1 <= len(files) <= 3:
                    raise ValueError("domain %r: want (root, certfile[, keyfile[, chainfile]])" % key)
                self.certificates[name] = files
            self.domains[(name, port)] = root

    def _minipub_resolve(self, req):
        host, scheme = req.environ.get("HTTP_HOST", ""), req.environ.get("wsgi.url_scheme", "http")
        if self.use_x_forwarded_host:
            trusted = self.trusted_proxies
            _, proto, forwarded = _forwarded_hop(
                req.environ, req.app.config["server.trusted_proxies"] if trusted is None else trusted)
            host, scheme = forwarded or host, proto or scheme
        try:
            name, port = _split_host(host) if host else (None, None)
        except ValueError:
            raise HTTPError(400, "Invalid host.") from None
        port = port or (443 if scheme == "https" else 80)
        root = self.domains.get((name, port), self.domains.get((name, None), self.default))
        if root is None:
            raise HTTPError(400, "No site is served for host %r here." % host)
        return root


def _split_host(host: str) -> tuple:
    """'WWW.Example.COM.:8080' -> ('www.example.com', 8080); the port is None if absent."""
    match = _HOST.fullmatch(host)
    if match is None or not match.group(1):
        raise ValueError("invalid host %r" % (host,))
    port = match.group(2)
    return match.group(1).lower().rstrip("."), int(port[1:]) if port and len(port) > 1 else None


def _attach_sni(context, app, config: dict) -> None:
    """If the application's VirtualHost carries certificates, choose them by SNI."""
    root = getattr(app, "root", None)
    if not isinstance(root, VirtualHost) or not root.certificates:
        return
    keys = ("server.ssl_certificate", "server.ssl_private_key", "server.ssl_certificate_chain")
    contexts = {name: make_ssl_context(dict(config, **dict(zip(keys, files + ("", "")))))
                for name, files in root.certificates.items()}  # a missing key or chain: ""

    def choose(sslobj, server_name, default):
        # Runs in the poll role during the non-blocking handshake: a dict lookup only.
        chosen = contexts.get((server_name or "").lower().rstrip("."))
        if chosen is not None:
            sslobj.context = chosen
    context.sni_callback = choose


# -- the tree: several applications in one process -------------------------------

class Tree:
    """``minipub.tree``: the applications of this process by mount point; itself the WSGI
    callable the server runs.  The longest mount point that prefixes the path wins."""

    def __init__(self):
        self.apps, self._order = {}, []

    def mount(self, root, script_name: str = "", config=None) -> "Application":
        """Serve the object tree ``root`` (or an Application) under ``script_name``."""
        script_name = script_name.rstrip("/")
        if isinstance(root, Application):
            app, root.script_name = root, script_name
        else:
            app = Application(root, config, script_name)
        self._put(script_name, app)
        return app

    def graft(self, wsgi_app, script_name: str = "") -> None:
        """Serve a foreign WSGI application under ``script_name``."""
        self._put(script_name.rstrip("/"), wsgi_app)

    def _put(self, script_name, app):
        self.apps[script_name] = app
        self._order = sorted(self.apps, key=len, reverse=True)

    def unmount(self, script_name: str = "") -> None:
        self.apps.pop(script_name.rstrip("/"), None)
        self._order = sorted(self.apps, key=len, reverse=True)

    @property
    def root(self):
        """The root object of the application at "" (the server's SNI looks for a VirtualHost)."""
        return getattr(self.apps.get(""), "root", None)

    def __call__(self, environ, start_response):
        for name in self._order:
            if not name or _mount(environ, name):
                app = self.apps[name]
                return app.serve(environ, start_response) if isinstance(app, Application) \
                    else app(environ, start_response)
        start_response("404 Not Found", list(_ERROR_HEADERS))
        return [error_page(404, "No application is mounted at this address.")]


tree = Tree()


class ServerSettings:
    """``minipub.server``: CherryPy's ``cherrypy.server``; its attributes are the server.* keys of
    minipub.config (``server.socket_port = 9000`` is ``config.update({"server.socket_port": 9000})``)."""

    def __getattr__(self, name):
        if "server." + name not in _ROWS:
            raise AttributeError("minipub.server has no setting %r" % name)
        return config["server." + name]

    def __setattr__(self, name, value):
        if "server." + name not in _ROWS:
            raise AttributeError("minipub.server has no setting %r" % name)
        config.update({"server." + name: value})

    def __repr__(self):
        return "<minipub.server %s>" % ", ".join("%s=%r" % (k[7:], config[k]) for k in _ROWS
                                                  if k.startswith("server."))


server = ServerSettings()


# ===========================================================================
# Hooks and tools: authentication, static files, uploads, JSON, gzip, ...
# Contract: a Tool is a hook (a callable at one of _HOOK_POINTS, with a
# priority; lower runs first) plus a config namespace: tools.NAME.on switches
# it on for a path or an object, tools.NAME.ARG are its keyword arguments, and
# @tools.NAME(ARG=...) writes the same keys into the decorated object's
# _cp_config.  Which tools are on for a route is worked out once per route
# (Application._plan), so a tool that is off costs a request nothing.  Hooks
# use only the public request/response objects and raise HTTPError to refuse.
# ===========================================================================

class Tool:
    """``Tool(point, callable, name=None, priority=50)``: ``callable(**args)`` runs at ``point``
    for every request whose configuration has ``tools.NAME.on``; register it with
    ``minipub.tools.NAME = Tool(...)``."""

    def __init__(self, point: str, callable, name: str = None, priority: int = 50, *, applies=None):
        self.name, self.priority, self.hooks = name, priority, []
        self.applies = applies  # (merged config, is_index, trailing) -> bool: left out where it cannot act
        self.also(point, callable, priority)

    def also(self, point: str, callable, priority: int = None) -> "Tool":
        """One more hook of the same tool, sharing its arguments (a session loads, saves, unlocks)."""
        if point not in _HOOK_POINTS:
            raise ValueError("unknown hook point %r; use one of %s" % (point, ", ".join(_HOOK_POINTS)))
        self.hooks.append((point, callable, priority))
        return self

    def accepts(self, arg: str) -> bool:
        return any(names is None or arg in names for names in map(_arg_names, (h[1] for h in self.hooks)))

    def __call__(self, **args):
        """``@tools.NAME(ARG=...)``: switch the tool on for a handler or a class's whole subtree."""
        for arg in args:
            if not self.accepts(arg):
                raise TypeError("tool %r takes no argument %r" % (self.name, arg))

        def decorate(target):
            conf = dict(getattr(target, "_cp_config", None) or {})  # a class keeps what it inherits
            conf["tools.%s.on" % self.name] = True
            conf.update(("tools.%s.%s" % (self.name, arg), value) for arg, value in args.items())
            target._cp_config = conf
            return target
        return decorate

    def bind(self, merged: dict, route) -> list:
        """[(priority, point, hook)] for a route whose merged configuration is ``merged``."""
        if self.applies is not None and not self.applies(merged, *route):
            return []
        prefix = "tools.%s." % self.name
        args = {key[len(prefix):]: value for key, value in merged.items()
                if key.startswith(prefix) and key[len(prefix):] not in ("on", "priority")}
        out = []
        for point, func, priority in self.hooks:
            names = _arg_names(func)
            mine = args if names is None else {k: v for k, v in args.items() if k in names}
            default = self.priority if priority is None else priority
            out.append((merged.get(prefix + "priority", default), point, functools.partial(func, **mine)))
        return out

    def __repr__(self):
        return "<minipub.Tool %s at %s>" % (self.name, self.hooks[0][0])


def _arg_names(func):
    """The keyword arguments ``func`` takes, or None if it takes any (**kwargs)."""
    _, _, names, _, varkw = _spec(func)
    return None if varkw else names


class Toolbox:
    """``minipub.tools``: ``tools.NAME = Tool(...)`` registers a tool under NAME."""

    def __setattr__(self, name, tool):
        if not isinstance(tool, Tool):
            raise TypeError("tools.%s must be a minipub.Tool" % name)
        tool.name = tool.name or name
        super().__setattr__(name, tool)


tools = Toolbox()


def _hooks_of(merged: dict, route) -> dict:
    """{point: (hook, ...)} in priority order for the tools on in ``merged``, plus hooks.POINT."""
    found = []
    for key, value in merged.items():
        if key.startswith("tools.") and key.endswith(".on") and value is True:
            found += getattr(tools, key[6:-3]).bind(merged, route)
        elif key.startswith("hooks."):
            found += [(50, key[6:], hook) for hook in value]
    if not found:
        return _NO_HOOKS
    hooks = {}
    for _, _, point, hook in sorted((p, n, point, h) for n, (p, point, h) in enumerate(found)):
        hooks.setdefault(point, []).append(hook)
    return {point: tuple(chain) for point, chain in hooks.items()}


# -- small tools: slashes, JSON, headers, negotiation, caching, proxies ---------

def _trailing_slash(missing: bool = True, extra: bool = False, status: int = None):
    """An index reached without its trailing slash is redirected to it (on by default, as in
    CherryPy: relative links in the page then work); ``extra`` removes a slash a handler does not want."""
    req = _local.request
    qs = "?" + req.query_string if req.query_string else ""
    if req.is_index and missing and req.path_info[-1:] != "/":
        raise HTTPRedirect(_quote_path(req.script_name + req.path_info) + "/" + qs, status or 301)
    if extra and not req.is_index and req.path_info[-1:] == "/" and req.path_info != "/":
        raise HTTPRedirect(_quote_path(req.script_name + req.path_info[:-1]) + qs, status or 301)


def _slash_applies(merged, is_index, trailing) -> bool:
    return (is_index and not trailing) or (trailing and bool(merged.get("tools.trailing_slash.extra")))


def _json_in(content_type=("application/json", "text/javascript"), force: bool = True, debug: bool = False):
    """The request's JSON document in ``request.json`` (415 for another type, 400 if malformed);
    the body is then not parsed as form parameters."""
    import json
    req = _local.request
    env = req.environ
    if not (env.get("CONTENT_LENGTH") not in (None, "", "0") or "HTTP_TRANSFER_ENCODING" in env):
        return
    kinds = (content_type,) if isinstance(content_type, str) else tuple(content_type)
    if env.get("CONTENT_TYPE", "").partition(";")[0].strip(" \t").lower() not in kinds:
        if force:
            raise HTTPError(415, "Expected a JSON body (Content-Type: %s)." % kinds[0])
        return
    try:
        req.json = json.loads(b"".join(iter(lambda: req.body.read(_BLOCK), b"")).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise HTTPError(400, "The body is not a valid JSON document: %s." % exc) from None
    req.process_request_body = False


def _json_out(content_type: str = "application/json", debug: bool = False, handler=None):
    """The handler's return value, whatever its type, sent as JSON (``handler`` may encode it)."""
    req, resp = _local.request, _local.response
    if req.__dict__.get("failed"):
        return  # an error page is already a body
    resp.body = handler(resp.body) if handler is not None else _json_bytes(resp.body)
    if content_type:
        resp.headers["Content-Type"] = content_type


def _response_headers(headers=(), force: bool = True, debug: bool = False):
    resp = _local.response
    for name, value in headers or ():
        if force or name not in resp.headers:
            resp.headers[name] = value


def _accept(media=None, debug: bool = False) -> str:
    """406, naming the types on offer, unless the client's Accept takes one of ``media``."""
    if not media:
        return None
    media = [media] if isinstance(media, str) else list(media)
    header = _local.request.environ.get("HTTP_ACCEPT")
    if not header:
        return media[0]
    best = max(media, key=lambda m: _accept_q(header, m))
    if _accept_q(header, best) <= 0:
        raise HTTPError(406, "Your client sent this Accept header: %s. But this resource only emits "
                        "these media types: %s." % (header, ", ".join(media)))
    return best


def _allow(methods=None, debug: bool = False):
    methods = [m.upper() for m in (methods or ("GET", "HEAD"))]
    if "GET" in methods and "HEAD" not in methods:
        methods.append("HEAD")
    allow = ", ".join(methods)
    _local.response.headers["Allow"] = allow
    if _local.request.method not in methods:
        raise HTTPError(405, "%s is not allowed here." % _local.request.method, [("Allow", allow)])


def _expires(secs=0, force: bool = False, debug: bool = False):
    """Expires / Cache-Control for ``secs`` seconds; 0 means do not cache.  A response that
    already carries validators or caching fields is left alone unless ``force``."""
    headers = _local.response.headers
    if not force and any(h in headers for h in ("ETag", "Last-Modified", "Age", "Expires")):
        return
    secs = secs.total_seconds() if hasattr(secs, "total_seconds") else float(secs)
    if secs <= 0:
        headers.update([("Cache-Control", "no-cache, must-revalidate"), ("Pragma", "no-cache"),
                        ("Expires", http_date(0))])
    else:
        headers.update([("Cache-Control", "max-age=%d" % secs), ("Expires", http_date(time.time() + secs))])


def _encode(encoding: str = "utf-8", text_only: bool = True, add_charset: bool = True, errors: str = "strict"):
    """Encode a str body (or str chunks) as ``encoding`` and say so in Content-Type."""
    req, resp = _local.request, _local.response
    ctype = resp.headers.get("Content-Type", "text/html")
    if req.__dict__.get("failed") or (text_only and not ctype.startswith("text/")):
        return
    body = resp.body
    if isinstance(body, str):
        resp.body = body.encode(encoding, errors)
    elif body is not None and not isinstance(body, (bytes, dict, list)) and not hasattr(body, "read"):
        resp.body = (c.encode(encoding, errors) if isinstance(c, str) else c for c in body)
    if add_charset:
        resp.headers["Content-Type"] = "%s; charset=%s" % (ctype.partition(";")[0].strip(), encoding)


def _proxy(base: str = None, trusted=("127.0.0.1", "::1"), debug: bool = False):
    """Behind a reverse proxy: ``base`` ("https://example.com") fixes the public scheme and host;
    otherwise Forwarded / X-Forwarded-* are believed from the ``trusted`` peers only (CherryPy
    believes anyone; a header any client can write must not move a redirect to another host)."""
    req = _local.request
    if base:
        scheme, _, host = base.partition("://")
        req.scheme, req.host = (scheme, host.rstrip("/")) if host else (req.scheme, scheme.rstrip("/"))
    else:
        _apply_forwarded(req, tuple(trusted))


tools.trailing_slash = Tool("before_handler", _trailing_slash, applies=_slash_applies)
tools.json_in = Tool("before_request_body", _json_in, priority=30)
tools.json_out = Tool("before_finalize", _json_out, priority=30)
tools.response_headers = Tool("on_start_resource", _response_headers)
tools.accept = Tool("on_start_resource", _accept)
tools.allow = Tool("on_start_resource", _allow)
tools.expires = Tool("before_finalize", _expires)
tools.encode = Tool("before_finalize", _encode, priority=70)
tools.proxy = Tool("before_request_body", _proxy, priority=30)


# -- gzip: negotiated, streamed ---------------------------------------------------
_COMPRESSIBLE = ("text/*", "application/json", "application/javascript", "application/xml", "image/svg+xml")


def _coding_q(header: str, coding: str) -> float:
    """The quality Accept-Encoding gives ``coding`` (RFC 9110 12.5.3): its own entry, else '*'."""
    entries = (item.strip(" \t").partition(";") for item in header.split(","))
    found = {name.strip(" \t").lower(): _qvalue(params) for name, _, params in entries}
    return found.get(coding, found.get("x-" + coding, found.get("*", 0.0)))


def _gzip(compress_level: int = 5, mime_types=_COMPRESSIBLE, min_size: int = 256, debug: bool = False):
    """Compress the body as it streams (zlib, never whole in memory) when the client's
    Accept-Encoding takes gzip: not tiny bodies, not partial ones, not types already compressed."""
    req, resp = _local.request, _local.response
    headers = resp.headers
    code = resp.status if isinstance(resp.status, int) else int(str(resp.status)[:3])
    ctype = headers.get("Content-Type", "text/html").partition(";")[0].strip().lower()
    if code < 200 or code in (204, 206, 304) or "Content-Encoding" in headers:
        return
    if not any(ctype == m or (m.endswith("/*") and ctype.startswith(m[:-1])) for m in mime_types):
        if resp.body is not None or ctype != "text/html":
            return
    vary = [v.strip() for v in headers.get("Vary", "").split(",") if v.strip()]
    if "accept-encoding" not in (v.lower() for v in vary):
        headers["Vary"] = ", ".join(vary + ["Accept-Encoding"])  # caches must key on it either way
    if _coding_q(req.environ.get("HTTP_ACCEPT_ENCODING", ""), "gzip") <= 0:
        return
    body = resp.body if req.__dict__.get("failed") else _body_of(resp.body, resp)
    if isinstance(body, list) and sum(map(len, body)) < min_size:
        resp.body = body if req.__dict__.get("failed") else b"".join(body)
        return
    headers.pop("Content-Length", None)
    headers["Content-Encoding"] = "gzip"
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):  # RFC 9110 8.8.3: a strong ETag names these exact bytes
        headers["ETag"] = "W/" + etag
    resp.body = _gzipped(body, compress_level)


def _gzipped(chunks, level: int):
    import zlib
    packer = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    try:
        for chunk in chunks:
            out = packer.compress(chunk)
            if out:
                yield out
        yield packer.flush()
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


tools.gzip = Tool("before_finalize", _gzip, priority=90)


# -- sessions: server-side stores or a signed cookie; CSRF --------------------
# tools.sessions (CherryPy's argument names and defaults where they exist)
# makes minipub.session at before_request_body, saves it at before_finalize
# (which also runs after a redirect or an HTTPError: a login that redirects
# keeps its session) and releases its lock at on_end_resource, which runs
# always: a handler that raises or a client that vanishes never leaves a
# session locked.  A store is a small class: load(token) -> (id, data,
# expires) or None, save(id, data, expires) -> the cookie value, delete(id),
# acquire(id), release(id), clean_up(now) -> sessions left.  The file, sqlite
# and cookie stores hold JSON, never pickle: a writable session directory must
# not be code execution.  Nothing wakes while no session exists: the cleanup
# timer is armed by a save and re-armed only while the store holds sessions.

_SESSION_ID = _Lazy(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32): 256 random bits


def _new_session_id() -> str:
    import secrets
    return secrets.token_urlsafe(32)


def _session_json(data) -> str:
    """``data`` as JSON, or a TypeError now, at save time, naming what JSON cannot hold."""
    import json
    keys = [k for k in data if not isinstance(k, str)]
    if keys:  # json.dumps would silently turn them into strings
        raise TypeError("session keys must be str, got %r" % (keys[0],))
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError("session values must be JSON (str, int, float, bool, None, list, dict): %s" % exc) from None


class MemoryStore:
    """Sessions in this process's memory (the default, CherryPy's "ram"): the fastest, but lost
    on restart and not shared between workers.  Values are kept as they are, not as JSON.

    Locking, shared by the stores: one lock per session, keyed by a slot taken from the (random)
    id; a thread lock, and for a store that several processes share (``lock_file``), a POSIX
    record lock on that file at the same slot.  Record locks belong to a process, so the thread
    lock is what keeps two threads of one worker apart; two ids in one slot merely wait."""

    lock_file = None

    def __init__(self, storage_path: str = None, secret=()):
        self.path, self.timer, self.sessions, self.guard, self.held = storage_path, None, {}, threading.Lock(), {}
        # Never closed: closing any descriptor of the file drops all of this process's locks on it.
        self.fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600) if self.lock_file else None

    def acquire(self, sid: str) -> None:
        slot = int.from_bytes(sid[:6].encode(), "big")
        with self.guard:
            entry = self.held.setdefault(slot, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()
        try:
            if self.fd is not None:
                import fcntl  # Unix: several processes (gunicorn -w N) share the store
                fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, slot)
        except BaseException:
            self._drop(slot, entry)
            raise

    def release(self, sid: str) -> None:
        slot = int.from_bytes(sid[:6].encode(), "big")
        with self.guard:
            entry = self.held[slot]
        try:
            if self.fd is not None:
                import fcntl
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, slot)
        finally:
            self._drop(slot, entry)

    def _drop(self, slot, entry):
        entry[0].release()
        with self.guard:
            entry[1] -= 1
            if not entry[1]:
                del self.held[slot]

    def arm(self, minutes: float, clock) -> None:
        """Start the cleanup timer unless it runs: called by a save, so no session means no timer."""
        if self.timer is None and minutes > 0:
            with self.guard:
                if self.timer is None:
                    self.timer = threading.Timer(minutes * 60, self._sweep, (minutes, clock))
                    self.timer.daemon, self.timer.name = True, "minipub-session-cleanup"
                    self.timer.start()

    def _sweep(self, minutes, clock):
        self.timer, left = None, 1
        try:
            left = self.clean_up(clock())
        except Exception:  # a failed sweep is logged and retried; it must not end cleanups for good
            _logger().exception("Session cleanup failed")
        if left:
            self.arm(minutes, clock)

    def load(self, token: str):
        found = self.sessions.get(token)
        return None if found is None else (token, dict(found[1]), found[0])

    def save(self, sid: str, data: dict, expires: float) -> str:
        self.sessions[sid] = (expires, dict(data))
        return sid

    def delete(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    def clean_up(self, now: float) -> int:
        for sid, (expires, _) in list(self.sessions.items()):
            if expires < now:
                self.sessions.pop(sid, None)
        return len(self.sessions)


def _session_record(sid, text):
    """(id, data, expires) from a stored JSON record, or None (logged, never the id) if it is not one."""
    import json
    try:
        record = json.loads(text)
        if isinstance(record, dict) and isinstance(record.get("data"), dict):
            return sid, record["data"], float(record["expires"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        pass
    _logger().warning("An unreadable session record was ignored (not JSON written by minipub)")
    return None


class FileStore(MemoryStore):
    """One JSON file per session in ``storage_path``, replaced atomically (write, then rename):
    shared by the processes of one machine and kept across restarts."""

    def __init__(self, storage_path: str = None, secret=()):
        if not storage_path:
            raise ConfigError("tools.sessions.storage_path: the file store needs a directory")
        os.makedirs(storage_path, 0o700, exist_ok=True)
        self.lock_file = os.path.join(storage_path, ".lock")
        super().__init__(storage_path)

    def _file(self, sid):
        return os.path.join(self.path, "session-" + sid)

    def load(self, token: str):
        if not _SESSION_ID.fullmatch(token):  # the id names a file: nothing else reaches the disk
            return None
        try:
            with open(self._file(token), "rb") as file:
                return _session_record(token, file.read())
        except FileNotFoundError:
            return None

    def save(self, sid: str, data: dict, expires: float) -> str:
        text = _session_json({"expires": expires, "data": data}).encode("utf-8")
        temp = "%s.%d-%d.tmp" % (self._file(sid), os.getpid(), threading.get_ident())
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(fd, "wb") as file:
                file.write(text)
            os.replace(temp, self._file(sid))  # readers see the old file or the new one, never half
        except BaseException:
            os.unlink(temp)
            raise
        return sid

    def delete(self, sid: str) -> None:
        try:
            os.unlink(self._file(sid))
        except FileNotFoundError:
            pass

    def clean_up(self, now: float) -> int:
        left = 0
        for name in os.listdir(self.path):
            sid = name[8:]
            if not (name.startswith("session-") and _SESSION_ID.fullmatch(sid)):
                continue
            self.acquire(sid)
            try:
                found = self.load(sid)
                if found is not None and found[2] < now:
                    self.delete(sid)
                else:
                    left += found is not None
            finally:
                self.release(sid)
        return left


class SqliteStore(MemoryStore):
    """One SQLite database file (WAL) for every session: shared by ``gunicorn -w N`` workers
    and reloader generations, kept across restarts; one connection per thread."""

    def __init__(self, storage_path: str = None, secret=()):
        if not storage_path:
            raise ConfigError("tools.sessions.storage_path: the sqlite store needs a database file")
        self.lock_file, self.local = storage_path + "-lock", threading.local()
        super().__init__(storage_path)
        self._db()  # a bad path fails at the first request, not at the first save

    def _db(self):
        local = self.local
        if getattr(local, "pid", None) != os.getpid():  # a connection never crosses a fork
            import sqlite3
            local.db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            local.db.execute("PRAGMA journal_mode=WAL")
            local.db.execute("CREATE TABLE IF NOT EXISTS minipub_sessions "
                             "(id TEXT PRIMARY KEY, expires REAL NOT NULL, record TEXT NOT NULL)")
            local.pid = os.getpid()
        return local.db

    def load(self, token: str):
        row = self._db().execute("SELECT record FROM minipub_sessions WHERE id = ?", (token,)).fetchone()
        return None if row is None else _session_record(token, row[0])

    def save(self, sid: str, data: dict, expires: float) -> str:
        self._db().execute("INSERT OR REPLACE INTO minipub_sessions VALUES (?, ?, ?)",
                           (sid, expires, _session_json({"expires": expires, "data": data})))
        return sid

    def delete(self, sid: str) -> None:
        self._db().execute("DELETE FROM minipub_sessions WHERE id = ?", (sid,))

    def clean_up(self, now: float) -> int:
        db = self._db()
        db.execute("DELETE FROM minipub_sessions WHERE expires < ?", (now,))
        return db.execute("SELECT count(*) FROM minipub_sessions").fetchone()[0]


class CookieStore(MemoryStore):
    """The session inside its cookie: JSON signed with HMAC-SHA256 under the first of ``secret``
    (any of them is accepted, so secrets rotate), expiry signed inside.  For several hosts with
    no shared store.  The client can READ it (base64 is not encryption), cannot change it, and
    a stolen cookie stays valid until it expires: nothing server-side can revoke it."""

    limit = 4000  # browsers keep ~4096 bytes per cookie, name and attributes included

    def __init__(self, storage_path: str = None, secret=()):
        keys = [secret] if isinstance(secret, (str, bytes)) else list(secret or ())
        if not keys or not all(keys):
            raise ConfigError("the cookie session store needs tools.sessions.secret: a list of secrets "
                              "(signs with the first, accepts any)")
        super().__init__()
        self.keys = [k.encode("utf-8") if isinstance(k, str) else k for k in keys]

    def _mac(self, key: bytes, payload: str) -> str:
        import base64
        import hashlib
        import hmac
        digest = hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def load(self, token: str):
        import base64
        import hmac
        payload, dot, mac = token.rpartition(".")
        if not dot or not token.isascii() or not any(
                hmac.compare_digest(self._mac(k, payload).encode(), mac.encode()) for k in self.keys):
            return None  # unsigned, tampered, or signed under a secret no longer listed
        import json
        record = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return record["id"], record["data"], record["expires"]

    def save(self, sid: str, data: dict, expires: float) -> str:
        import base64
        text = _session_json({"id": sid, "expires": expires, "data": data})
        payload = base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=").decode("ascii")
        token = payload + "." + self._mac(self.keys[0], payload)
        if len(token) > self.limit:
            raise ValueError("the session is %d bytes as a cookie; browsers keep about 4 KB: store less, "
                             "or use a server-side store" % len(token))
        return token

    def delete(self, sid: str) -> None:
        pass  # the expired cookie is the deletion

    def acquire(self, sid: str) -> None:
        pass  # the data is in the client's requests: nothing here to lock

    release = acquire

    def arm(self, minutes, clock) -> None:
        pass  # nothing stored here, nothing to clean


_STORE_TYPES = {"memory": MemoryStore, "ram": MemoryStore, "file": FileStore, "sqlite": SqliteStore,
                "cookie": CookieStore}
_stores, _stores_lock = {}, _thread.allocate_lock()


def _store_for(storage_class, storage_type: str, storage_path: str, secret):
    """The one store of these settings in this process (a class is instantiated once; an instance is used as is)."""
    if storage_class is not None and not isinstance(storage_class, type):
        return storage_class
    cls = storage_class or _STORE_TYPES.get(storage_type)
    if cls is None:
        raise ConfigError("tools.sessions.storage_type %r: use one of %s" % (storage_type, ", ".join(_STORE_TYPES)))
    key = (cls, storage_path, tuple(secret) if isinstance(secret, list) else secret)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = cls(storage_path, secret)
    return store


from collections.abc import MutableMapping  # noqa: E402 - loaded with os already; costs nothing


class Session(MutableMapping):
    """minipub.session: a dict of this client's data, loaded at first use.  ``id`` (a fresh one
    when the client sent none, or one the store does not know: never adopted), ``originalid``
    (what the client sent), ``loaded``, ``regenerate()``, ``delete()``, ``acquire_lock()``."""

    def __init__(self, store, token: str, timeout: float, locking: str, clock=time.time):
        if locking not in ("implicit", "early", "explicit"):
            raise ConfigError("tools.sessions.locking %r: use implicit, early or explicit" % (locking,))
        self.store, self.timeout, self.locking, self.clock = store, timeout, locking, clock
        self.originalid, self.loaded, self.locked, self.existed = token, False, None, False
        self._id, self._data, self._discard, self._gone = None, None, [], False
        if locking == "early":
            self._open()

    def _open(self) -> dict:
        if self.loaded:
            return self._data
        token = self.originalid
        if token and _SESSION_ID.fullmatch(token) and self.locking != "explicit":
            self.store.acquire(token)  # implicit: locked from the first use until saved
            self.locked = token
        found = self.store.load(token) if token else None
        if found is not None and found[2] < self.clock():
            self.store.delete(found[0])  # expired: removed now, lazily
            found = None
        if found is None:
            self.release_lock()
            self._id, self._data = _new_session_id(), {}
        else:
            self._id, self._data, self.existed = found[0], found[1], True
            self.originalid = found[0]  # the cookie store's cookie is the signed data; its id is inside
        self.loaded = True
        return self._data

    @property
    def id(self) -> str:
        self._open()
        return self._id

    def __getitem__(self, key):
        return self._open()[key]

    def __setitem__(self, key, value):
        self._open()[key] = value

    def __delitem__(self, key):
        del self._open()[key]

    def __iter__(self):
        return iter(list(self._open()))

    def __len__(self):
        return len(self._open())

    def acquire_lock(self) -> None:
        """Explicit locking: lock now; data read before is read again under the lock."""
        self._open()
        if not self.locked:
            self.store.acquire(self._id)
            self.locked = self._id
            found = self.store.load(self._id) if self.existed else None
            if found is not None:
                self._data = found[1]

    def release_lock(self) -> None:
        if self.locked:
            sid, self.locked = self.locked, None
            self.store.release(sid)

    def regenerate(self) -> None:
        """A fresh id for the same data (do it on login): the old id is deleted when this one is saved."""
        self._open()
        self._discard.append(self._id)
        self._id = _new_session_id()

    def delete(self) -> None:
        """Forget the session in the store and expire its cookie."""
        self._open()
        self.store.delete(self._id)
        self._id, self._data, self.existed, self._gone = _new_session_id(), {}, False, True

    def save(self, set_cookie) -> bool:
        """Store the data if it was used and has any (``set_cookie(value or None)``); always unlocks."""
        try:
            saved = self.loaded and bool(self._data or self.existed)
            if saved:
                set_cookie(self.store.save(self._id, self._data, self.clock() + self.timeout * 60))
            elif self._gone or self._discard:
                set_cookie(None)
            for old in self._discard:  # after the new id is stored: no moment without the data
                self.store.delete(old)
            self._discard = []
            return saved
        finally:
            self.release_lock()


def _session_init(storage_class=None, storage_type: str = "memory", storage_path: str = None, timeout: float = 60,
                  locking: str = "implicit", name: str = "session_id", path: str = "/", path_header: str = None,
                  domain: str = None, secure: bool = None, httponly: bool = True, samesite: str = "Lax",
                  persistent: bool = True, secret=(), clock=time.time):
    req = _local.request
    store = _store_for(storage_class, storage_type, storage_path, secret)
    sess = Session(store, req.cookies.get(name), timeout, locking, clock)
    if path_header:
        path = req.environ.get(_env_key(path_header), path)
    max_age = int(timeout * 60) if persistent else None
    sess.set_cookie = lambda value: _local.response.set_cookie(  # None expires the cookie
        name, value or "", max_age if value else 0, path, domain, secure, httponly, samesite)
    _local.session = sess


def _session_save(clean_freq: float = 5, debug: bool = False):  # tools.sessions.* as _session_init's
    sess = _local.__dict__.get("session")
    if sess is None:
        return
    if sess.save(sess.set_cookie):
        sess.store.arm(clean_freq, sess.clock)
    if debug:
        _logger().debug("session %s", "saved" if sess.loaded else "not used")  # never the id


def _session_close():
    sess = _local.__dict__.pop("session", None)
    if sess is not None:
        sess.release_lock()


tools.sessions = Tool("before_request_body", _session_init).also("before_finalize", _session_save) \
    .also("on_end_resource", _session_close)


class _SessionProxy(_Proxy):
    """minipub.session: a proxy that is also a mapping (operators are looked up on the type)."""

    __slots__ = ()


for _op in ("__getitem__", "__setitem__", "__delitem__", "__contains__", "__iter__", "__len__"):
    setattr(_SessionProxy, _op, lambda self, *args, _op=_op: getattr(self._target(), _op)(*args))


session = _SessionProxy("session")


_UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def csrf_token() -> str:
    """This session's CSRF token, made at first use: send it back as the ``csrf_token`` form field
    or the X-CSRF-Token header of a form or request the csrf tool checks."""
    sess = _local.__dict__.get("session")
    if sess is None:
        raise RuntimeError("minipub.csrf_token() needs tools.sessions.on for this path")
    if "_csrf_token" not in sess:
        sess["_csrf_token"] = _new_session_id()  # as unguessable as a session id
    return sess["_csrf_token"]


def _origin(scheme: str, host: str) -> str:
    """scheme://host with the default port left out, as browsers write Origin (RFC 6454 6.1)."""
    host = host.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme.lower())
    return "%s://%s" % (scheme.lower(), host[:-len(default)] if default and host.endswith(default) else host)


def _csrf(methods=_UNSAFE_METHODS, field: str = "csrf_token", header: str = "X-CSRF-Token",
          cookieless: bool = False, debug: bool = False):
    """Refuse (403) an unsafe request a browser sent from another origin: accepted when
    Sec-Fetch-Site says same-origin or none (typed by the user), when Origin is this request's
    own origin (trusted proxies honoured), or when the session's csrf_token() came back.
    Without cookies there is no session to ride on, so nothing to check unless ``cookieless``."""
    req = _local.request
    env = req.environ
    sent = req.params.pop(field, None)  # the token is the tool's, not a handler argument
    if req.method not in methods or (not cookieless and not env.get("HTTP_COOKIE")):
        return
    if env.get("HTTP_SEC_FETCH_SITE") in ("same-origin", "none"):
        return
    origin = env.get("HTTP_ORIGIN")
    if origin and origin.rstrip("/").lower() == _origin(req.scheme, req.host):
        return
    sent = sent if isinstance(sent, str) else env.get(_env_key(header))
    sess = _local.__dict__.get("session")
    expected = sess.get("_csrf_token") if sess is not None else None
    import hmac
    if sent and expected and hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8")):
        return
    raise HTTPError(403, "Cross-site request refused: this %s came from another site (Origin %s, "
                    "Sec-Fetch-Site %s) without this site's CSRF token." % (
                        req.method, origin or "not sent", env.get("HTTP_SEC_FETCH_SITE") or "not sent"))


tools.csrf = Tool("before_handler", _csrf)


# -- authentication (RFC 7617 Basic, RFC 7616 Digest) -----------------------
# tools.auth_basic / tools.auth_digest (before_request_body, priority 1: a 401
# comes before a 405 or a 404 for mismatched parameters) answer malformed
# credentials with 400, missing or wrong ones with 401 and one WWW-Authenticate
# field per challenge, and set request.login on success.  The decorators
# auth_basic() / auth_digest() switch them on for a class or a handler and
# return it, so @expose and signature binding see the original function.

# auth-param = token BWS "=" BWS ( token / quoted-string ), in a #list whose
# empty elements are skipped (RFC 9110 5.6.1); the scan is linear in length.
_AUTH_PARAM = _Lazy(r'[ \t,]*([%s]+)[ \t]*=[ \t]*(?:([%s]+)|"((?:[^"\\]|\\.)*)")[ \t]*(?:,|$)'
                         % ((_TCHAR.decode("ascii"),) * 2))
_DIGESTS = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
_NONCE_TABLE = 10000  # nonces whose nc values are remembered, per realm: about 3 MB at most
_NC_WINDOW = 64       # nc values accepted out of order below the highest seen for a nonce


def _credentials(req, scheme: str):
    """The text after ``scheme`` in Authorization; None if absent or another scheme."""
    name, _, rest = req.environ.get("HTTP_AUTHORIZATION", "").strip(" \t").partition(" ")
    return rest.strip(" \t") if name.lower() == scheme else None


def _quoted(text: str) -> str:
    """A quoted-string for a challenge, as WSGI latin-1 text of its UTF-8 bytes."""
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8").decode("latin-1")


def _auth_params(text: str) -> dict:
    """A #auth-param list as UTF-8 text; 400 on bad syntax, duplicates or over 32 params."""
    try:
        text = text.encode("latin-1").decode("utf-8").rstrip(" \t,")  # we sent charset=UTF-8
    except UnicodeError:
        raise HTTPError(400, "Credentials are not valid UTF-8.") from None
    params, pos = {}, 0
    while pos < len(text):
        match = _AUTH_PARAM.match(text, pos)
        if match is None or len(params) >= 32:
            raise HTTPError(400, "Malformed Authorization header.")
        name, token, quoted = match.groups()
        if name.lower() in params:
            # RFC 7235 2.1: "Each parameter name MUST only occur once per challenge."
            raise HTTPError(400, "Duplicate %r in the Authorization header." % name)
        params[name.lower()] = token if token is not None else re.sub(r"\\(.)", r"\1", quoted)
        pos = match.end()
    return params


def auth_basic(realm: str, users: dict = None, checkpassword=None):
    """Decorator: HTTP Basic (RFC 7617) on a class (its whole subtree) or a handler; give
    ``users={name: password}`` or ``checkpassword(realm, user, password) -> bool``."""
    _one_of(users, checkpassword, "auth_basic", "checkpassword")
    return tools.auth_basic(realm=realm, users=users, checkpassword=checkpassword)


def _one_of(users, other, tool: str, name: str) -> None:
    if (users is None) == (other is None):
        raise TypeError("%s needs exactly one of users= or %s=" % (tool, name))


def _checkpassword_dict(user_password_dict: dict):
    """CherryPy's lib.auth_basic.checkpassword_dict: a checkpassword(realm, user, password)."""
    import hmac

    def checkpassword(realm, user, password):
        stored = user_password_dict.get(user)  # an unknown user is compared too: no early answer
        same = hmac.compare_digest((stored or "").encode("utf-8"), password.encode("utf-8"))
        return same and stored is not None
    return checkpassword


def _basic(realm: str, users: dict = None, checkpassword=None, accept_charset: str = "utf-8"):
    """tools.auth_basic: the Basic check for one request."""
    import base64
    _one_of(users, checkpassword, "tools.auth_basic", "checkpassword")
    req = _local.request
    challenge = [("WWW-Authenticate", 'Basic realm=%s, charset="UTF-8"' % _quoted(realm))]
    token = _credentials(req, "basic")
    if token is None:
        raise HTTPError(401, "Authentication required.", challenge)
    try:  # an empty token decodes to "", which has no colon: 400
        text = base64.b64decode(token, validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, non-ASCII text, UnicodeDecodeError
        raise HTTPError(400, "Basic credentials are not base64 of UTF-8 text.") from None
    user, colon, password = text.partition(":")
    # RFC 7617 2: "The user-id and password MUST NOT contain any control characters"
    if not colon or re.search(r"[\x00-\x1f\x7f]", text):
        raise HTTPError(400, "Basic credentials must be user-id:password, no control characters.")
    if not (checkpassword if users is None else _checkpassword_dict(users))(realm, user, password):
        raise HTTPError(401, "Wrong user name or password.", challenge)
    req.login = user


def auth_digest(realm: str, users: dict = None, get_ha1=None, algorithms=("SHA-256", "MD5"),
                nonce_lifetime: float = 300.0, userhash: bool = False, clock=time.monotonic):
    """Decorator: HTTP Digest (RFC 7616) on a class (its whole subtree) or a handler; give
    ``users={name: password}`` or ``get_ha1(realm, user, algorithm) -> hex or None`` (H(user:realm:password):
    no password stored).  One challenge per ``algorithms`` entry (MD5, SHA-256, SHA-512-256, each also
    -sess), most preferred first: urllib reads only the first and knows only MD5.  ``userhash`` needs ``users``.
    """
    space = _digest_space(realm, users, get_ha1, algorithms, nonce_lifetime, userhash, clock, None)
    return tools.auth_digest(realm=realm, users=users, get_ha1=get_ha1, algorithms=tuple(space.algorithms),
                             nonce_lifetime=nonce_lifetime, userhash=userhash, clock=clock)


_digest_spaces, _spaces_lock = {}, _thread.allocate_lock()
_NONCE_SECRET = None  # in a worker process: the secret the parent gave every worker


def _digest_space(realm, users, get_ha1, algorithms, lifetime, userhash, clock, key):
    """The protection space (nonce secret, replay table) for these arguments, made once."""
    ident = (realm, id(users), id(get_ha1), tuple(algorithms), lifetime, userhash, id(clock), key)
    space = _digest_spaces.get(ident)
    if space is None:
        with _spaces_lock:
            space = _digest_spaces.get(ident)
            if space is None:
                space = _Digest(realm, users, get_ha1, algorithms, lifetime, userhash, clock, key)
                while len(_digest_spaces) >= 1000:
                    _digest_spaces.pop(next(iter(_digest_spaces)))
                _digest_spaces[ident] = space
    return space


def _digest(realm: str, users: dict = None, get_ha1=None, algorithms=("SHA-256", "MD5"),
            nonce_lifetime: float = 300.0, userhash: bool = False, clock=time.monotonic, key=None,
            accept_charset: str = "utf-8"):
    """tools.auth_digest: ``key`` is the nonce secret (give the same to every worker process)."""
    _digest_space(realm, users, get_ha1, algorithms, nonce_lifetime, userhash, clock, key)(_local.request)


class _Digest:
    """One protection space: challenges, stateless nonces, the (nonce, nc) replay table."""

    def __init__(self, realm, users, get_ha1, algorithms, lifetime, userhash, clock, key=None):
        from collections import OrderedDict
        if (users is None) == (get_ha1 is None) or (userhash and users is None):
            raise TypeError("auth_digest needs one of users= or get_ha1= (userhash needs users=)")
        if get_ha1 is not None and len(_spec(get_ha1)[0]) == 2:
            # CherryPy's get_ha1(realm, user) returns H(A1) for MD5 only.
            plain, algorithms = get_ha1, [a for a in algorithms if a.upper().startswith("MD5")] or ["MD5"]
            get_ha1 = lambda realm, user, algorithm: plain(realm, user)  # noqa: E731
        if users is not None:
            def get_ha1(realm, user, algorithm):
                password = users.get(user)
                return None if password is None else self.h(algorithm, "%s:%s:%s" % (user, realm, password))
        self.algorithms = {a.upper(): a.upper().replace("-SESS", "-sess") for a in algorithms}
        for name in self.algorithms or [""]:
            self.h(name, "")  # ValueError for an unknown one, or one this OpenSSL lacks
        self.realm, self.users, self.get_ha1, self.userhash = realm, users, get_ha1, userhash
        self.lifetime, self.clock = float(lifetime), clock
        secret = key.encode("utf-8") if isinstance(key, str) else key
        self.secret = secret or _NONCE_SECRET or os.urandom(32)
        self.opaque = self.mac(b"opaque").hex()  # from the secret: the same in every worker sharing it
        self.seen, self.floor, self.lock = OrderedDict(), -1.0, threading.Lock()

    @staticmethod
    def h(algorithm: str, text: str) -> str:
        import hashlib
        name = _DIGESTS.get(algorithm.upper().replace("-SESS", ""))
        if name is None:
            raise ValueError("unknown digest algorithm %r" % algorithm)
        return hashlib.new(name, text.encode("utf-8")).hexdigest()

    def mac(self, head: bytes) -> bytes:
        import hmac
        return hmac.new(self.secret, head, "sha256").digest()[:16]

    def challenges(self, stale: bool = False) -> list:
        # nonce = issue time (microseconds) + 8 random bytes + an HMAC of both: it
        # verifies without server state, and no two clients ever share one.
        head = int(self.clock() * 1e6).to_bytes(8, "big") + os.urandom(8)
        extra = (", userhash=true" if self.userhash else "") + (", stale=true" if stale else "")
        return [("WWW-Authenticate", 'Digest realm=%s, qop="auth, auth-int", algorithm=%s, nonce="%s", '
                 'opaque="%s", charset=UTF-8%s' % (_quoted(self.realm), name, (head + self.mac(head)).hex(),
                                                  self.opaque, extra)) for name in self.algorithms.values()]

    def issued(self, nonce: str):
        """The issue time of one of our nonces, or None if it is not one."""
        import hmac
        raw = bytes.fromhex(nonce) if re.fullmatch(r"[0-9a-f]{64}", nonce) else b"\0" * 32
        return int.from_bytes(raw[:8], "big") / 1e6 if hmac.compare_digest(raw[16:], self.mac(raw[:16])) else None

    def __call__(self, req):
        import hmac
        text = _credentials(req, "digest")
        if text is None:
            raise HTTPError(401, "Authentication required.", self.challenges())
        p = _auth_params(text)
        missing = [k for k in ("realm", "nonce", "uri", "response", "qop", "nc", "cnonce") if k not in p]
        if missing or ("username" in p) == ("username*" in p):
            raise HTTPError(400, "Digest credentials lack %s." % (", ".join(missing) or "one username"))
        if p["qop"] not in ("auth", "auth-int") or not re.fullmatch(r"[0-9a-fA-F]{8}", p["nc"]):
            raise HTTPError(400, "Digest qop must be auth or auth-int, nc 8 hex digits.")
        if not _same_target(req.environ, p["uri"]):
            # RFC 7616 3.4.6: "The authenticating server MUST assure that the resource
            # designated by the "uri" parameter is the same as the resource specified
            # in the Request-Line; if they are not, the server SHOULD return a 400".
            raise HTTPError(400, "Digest uri does not match the request target.")
        algorithm, issued = p.get("algorithm", "MD5").upper(), self.issued(p["nonce"])
        if (p["realm"] != self.realm or algorithm not in self.algorithms or issued is None
                or not hmac.compare_digest(p.get("opaque", self.opaque).encode(), self.opaque.encode())):
            raise HTTPError(401, "Authentication required.", self.challenges())
        user = self.username(p, algorithm)
        ha1 = None if user is None else self.get_ha1(self.realm, user, algorithm.replace("-SESS", ""))
        if ha1 is not None and algorithm.endswith("-SESS"):
            ha1 = self.h(algorithm, "%s:%s:%s" % (ha1, p["nonce"], p["cnonce"]))
        a2 = "%s:%s" % (req.method, p["uri"])
        if p["qop"] == "auth-int":
            a2 += ":" + self.body_hash(req, algorithm)
        expected = self.h(algorithm, "%s:%s:%s:%s:%s:%s" % (
            ha1 or os.urandom(16).hex(), p["nonce"], p["nc"], p["cnonce"], p["qop"], self.h(algorithm, a2)))
        if not hmac.compare_digest(expected.encode(), p["response"].lower().encode()) or ha1 is None:
            raise HTTPError(401, "Wrong user name or password.", self.challenges())
        if not self.fresh(p["nonce"], issued, int(p["nc"], 16)):
            # RFC 7616 3.3: stale "indicates that the previous request from the client was
            # rejected because the nonce value was stale": the client retries, not the user.
            raise HTTPError(401, "The nonce is used up or expired.", self.challenges(stale=True))
        req.login = user

    def username(self, p: dict, algorithm: str):
        """The user named by username, username* (RFC 8187 ext-value) or a userhash."""
        import hmac
        from urllib.parse import unquote_to_bytes
        if "username*" in p:
            match = re.fullmatch(r"(?i:utf-8)'[^']*'(.*)", p["username*"])
            try:
                if match is None or p.get("userhash", "false").lower() != "false":
                    raise ValueError("username* must be UTF-8''percent-encoded, without userhash")
                return unquote_to_bytes(match.group(1)).decode("utf-8")
            except ValueError as exc:  # UnicodeDecodeError included
                raise HTTPError(400, "Invalid username*: %s." % exc) from None
        if p.get("userhash", "false").lower() != "true":
            return p["username"]
        if not self.userhash:
            raise HTTPError(400, "userhash was not offered.")
        wanted = p["username"].lower().encode()
        found = [name for name in self.users  # every name is hashed and compared: no early exit
                 if hmac.compare_digest(self.h(algorithm, "%s:%s" % (name, self.realm)).encode(), wanted)]
        return found[-1] if found else None

    def body_hash(self, req, algorithm: str) -> str:
        """H(entity-body) for qop=auth-int; the body is spooled so the handler still reads it."""
        import hashlib
        import tempfile
        digest = hashlib.new(_DIGESTS[algorithm.replace("-SESS", "")])
        body = tempfile.SpooledTemporaryFile(req.config["request.upload_spool_size"])
        for block in iter(lambda: req.body.read(64 * KiB), b""):
            digest.update(block)
            body.write(block)
        body.seek(0)
        req.body = req.environ["wsgi.input"] = body
        return digest.hexdigest()

    def fresh(self, nonce: str, issued: float, nc: int) -> bool:
        """Accept each (nonce, nc) once while the nonce is young, in bounded memory."""
        now = self.clock()
        if now - issued > self.lifetime:
            return False
        with self.lock:
            seen = self.seen
            while seen and now - next(iter(seen.values()))[0] > self.lifetime:
                seen.popitem(last=False)  # expired: refused above before this table is asked
            entry = seen.get(nonce)
            if entry is None:
                if issued <= self.floor:
                    return False  # forgotten to make room, so it may have been used
                while len(seen) >= _NONCE_TABLE:
                    self.floor = max(self.floor, seen.popitem(last=False)[1][0])
                entry = seen[nonce] = [issued, 0, 1]  # issue time, highest nc, bits (nc 0 invalid)
            _, top, mask = entry
            if nc > top:  # slide the window: bit i stands for nc = top - i
                top, mask = nc, (mask << min(nc - top, _NC_WINDOW)) & ((1 << _NC_WINDOW) - 1)
            elif top - nc >= _NC_WINDOW or mask >> (top - nc) & 1:
                return False
            entry[1:] = top, mask | 1 << (top - nc)
            return True


# Before the body is read (CherryPy: before_handler): an unauthenticated client's upload is
# never parsed, and auth-int can hash the body before the form parser consumes it.
tools.auth_basic = Tool("before_request_body", _basic, priority=1)
tools.auth_digest = Tool("before_request_body", _digest, priority=1)


def _same_target(environ: dict, uri: str) -> bool:
    """Does the Digest ``uri`` name the request target (origin- or absolute-form)?"""
    target = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if not target:  # another server: rebuild it
        query = environ.get("QUERY_STRING", "")
        target = _quote_path(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
        target += "?" + query if query else ""
    absolute = _ABSOLUTE.fullmatch(target)
    return uri == target or (absolute is not None and uri == (absolute.group(3) or "/"))


# -- static files -------------------------------------------------------------

# Types some platforms map wrongly (a Windows registry can say text/plain for
# .js, which browsers refuse to run under nosniff).
_WEB_TYPES = {".css": "text/css", ".js": "text/javascript", ".mjs": "text/javascript",
              ".wasm": "application/wasm", ".json": "application/json", ".svg": "image/svg+xml"}
_TEXTUAL = ("text/", "application/javascript", "application/json", "application/xml", "image/svg+xml")
_RANGE = _Lazy(r"bytes=([0-9]{0,18})-([0-9]{0,18})")
_ENCODED_SLASH = _Lazy(r"(?i)%(2f|5c|00)")


def _content_type(path: str) -> str:
    import mimetypes
    ctype, encoding = mimetypes.guess_type(path)
    ctype = _WEB_TYPES.get(os.path.splitext(path)[1].lower(), ctype)
    if encoding or not ctype:  # x.tar.gz is gzip data, not a tar file
        return "application/gzip" if encoding == "gzip" else "application/octet-stream"
    return ctype + "; charset=utf-8" if ctype.startswith(_TEXTUAL) else ctype


def _http_time(value):
    """Seconds since the epoch of an HTTP-date; None if it is absent or not one."""
    from email.utils import parsedate_to_datetime
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None  # RFC 9110 13.1.3: "A recipient MUST ignore ... not a valid HTTP-date"


def _etag_in(header: str, etag: str, weak: bool) -> bool:
    tags = [t.strip(" \t") for t in header.split(",")]
    tags = [t[2:] if weak and t.startswith("W/") else t for t in tags]
    return "*" in tags or etag in tags


def _precondition(req, etag: str, mtime: int) -> bool:
    """RFC 9110 13.2.2 evaluation order: raise 412, or True for a 304."""
    get, headers = req.method in ("GET", "HEAD"), req.headers
    if "If-Match" in headers:
        failed = not _etag_in(headers["If-Match"], etag, weak=False)  # the strong comparison
    else:
        failed = mtime > (_http_time(headers.get("If-Unmodified-Since")) or float("inf"))
    if "If-None-Match" in headers:
        matched = _etag_in(headers["If-None-Match"], etag, weak=True)
    else:
        matched = get and mtime <= (_http_time(headers.get("If-Modified-Since")) or -1.0)
    if failed or (matched and not get):
        raise HTTPError(412, "Precondition failed.")
    return matched


def _byte_range(req, size: int, etag: str, last_modified: str):
    """(offset, length) to send: one satisfiable Range makes a 206; 416 raises."""
    header, if_range = req.headers.get("Range"), req.headers.get("If-Range")
    if header is None or req.method != "GET" or if_range not in (None, etag, last_modified):
        return 0, size  # RFC 9110 13.1.5: a failed If-Range means it changed, send all of it
    match = _RANGE.fullmatch(header.replace(" ", ""))
    if match is None or match.groups() == ("", ""):
        return 0, size  # several ranges or an unknown unit: a 200 is a valid answer
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    else:  # suffix-range: the last N bytes
        start, end = max(0, size - int(last)), size - 1
    if start >= size or start > end or (not first and not int(last)):
        raise HTTPError(416, "Range not satisfiable.", [("Content-Range", "bytes */%d" % size)])
    response.status = 206
    response.headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, size)
    response.headers["Content-Length"] = end - start + 1
    return start, end - start + 1


def serve_file(path: str, content_type: str = None, disposition: str = None, name: str = None, *,
               cache_control: str = None):
    """Answer with the file at ``path`` as a FileWrapper: validators, 304/412, one Range, HEAD;
    ``disposition`` ("attachment" or "inline") adds a Content-Disposition naming the file (or ``name``)."""
    import stat as modes
    try:
        file = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise NotFound() from None
    except PermissionError:
        raise HTTPError(403) from None
    try:
        stat = os.fstat(file.fileno())
        if not modes.S_ISREG(stat.st_mode):
            raise NotFound()
        mtime, size, headers = int(stat.st_mtime), stat.st_size, response.headers
        etag, last_modified = '"%x-%x"' % (stat.st_mtime_ns, size), http_date(mtime)
        # A 304 also gets Content-Length: "the size a 200 would have" (RFC 9110 8.6).
        headers.update([("ETag", etag), ("Last-Modified", last_modified), ("Accept-Ranges", "bytes"),
                        ("X-Content-Type-Options", "nosniff"), ("Content-Length", size)])
        if cache_control:
            headers["Cache-Control"] = cache_control
        if _precondition(request, etag, mtime):
            response.status = 304
            file.close()
            return None
        headers["Content-Type"] = content_type or _content_type(path)
        if disposition:
            from urllib.parse import quote
            name = name or os.path.basename(path)
            headers["Content-Disposition"] = '%s; filename="%s"; filename*=UTF-8\'\'%s' % (
                disposition, re.sub(r'[^\x20-\x7e]|["\\]', "_", name), quote(name, safe=""))
        return FileWrapper(file, 256 * KiB, *_byte_range(request, size, etag, last_modified))
    except BaseException:
        file.close()
        raise


def serve_download(path: str, name: str = None):
    """serve_file() as an attachment the browser saves (CherryPy's lib.static.serve_download)."""
    return serve_file(path, "application/x-download", "attachment", name)


class StaticDir:
    """Serve the files under ``root_dir``: ``Root.static = StaticDir("/abs/dir")``.

    Nothing outside ``root_dir`` is reachable: '..', '.', empty segments, '\\',
    ':' and NUL in a segment and '%2f', '%5c' or '%00' in the raw URL are
    refused; symlinks leading outside are refused unless ``follow_symlinks``.
    A directory serves its ``index`` file (no listings).
    """

    exposed = True  # every other attribute is private: path segments look them up

    def __init__(self, root_dir: str, index: str = "index.html", follow_symlinks: bool = False,
                 cache_control: str = "no-cache"):
        self._root = os.path.realpath(root_dir)
        self._index, self._follow, self._cache = index, follow_symlinks, cache_control

    def GET(self, *segments, **params):  # and HEAD; other methods get 405 with Allow: GET, HEAD
        return self._serve(segments)

    def _serve(self, segments, content_types=None):
        req = _local.request
        path = self._resolve(req, segments)
        if os.path.isdir(path):
            if not req.path_info.endswith("/"):
                target = _quote_path(req.script_name + req.path_info) + "/"
                if target.startswith("//"):
                    raise NotFound()  # a redirect never leaves this host
                raise HTTPRedirect(target + ("?" + req.query_string if req.query_string else ""), 301)
            if not self._index:
                raise NotFound()
            path = self._resolve(req, tuple(segments) + (self._index,))
        return _serve_typed(path, content_types, self._cache)

    def _resolve(self, req, segments) -> str:
        raw = req.environ.get("RAW_URI") or req.environ.get("REQUEST_URI") or ""
        match = _ABSOLUTE.fullmatch(raw)
        raw = (match.group(3) if match else raw).partition("?")[0]
        if _ENCODED_SLASH.search(raw):
            raise HTTPError(403, "Encoded separators are not allowed.")
        if any(s in ("", ".", "..") or re.search(r"[\\:\0]", s) for s in segments):
            raise HTTPError(403, "Invalid path segment.")
        path = os.path.join(self._root, *segments)
        real = os.path.realpath(path)
        if not self._follow and os.path.commonpath((real, self._root)) != self._root:
            raise HTTPError(403, "This link leads outside the static directory.")
        return path if self._follow else real


def _static_root(path: str, root, where: str) -> str:
    """An absolute path for tools.staticdir.dir / staticfile.filename: a relative one is under root."""
    if os.path.isabs(path):
        return path
    if not root or not os.path.isabs(root):
        raise ConfigError("%s: %r is relative; give an absolute path or an absolute tools.staticdir.root"
                          % (where, path))
    return os.path.join(root, path)


_static_dirs = {}


def _serve_typed(path: str, content_types: dict, cache_control: str = None):
    """serve_file(), typed by ``content_types`` ({extension: type}) where it names the file's."""
    ctype = (content_types or {}).get(os.path.splitext(path)[1].lstrip(".").lower())
    return serve_file(path, ctype, cache_control=cache_control)


def _staticdir(section: str, dir: str, root: str = None, match: str = "", content_types: dict = None,
               index: str = "", debug: bool = False):
    """tools.staticdir: the file under ``dir`` at the request's path below ``section``; a missing
    file leaves the request to its handler (usually a 404)."""
    def serve(req):
        base = _static_root(dir, root, "tools.staticdir.dir")
        server = _static_dirs.get((base, index))
        if server is None:
            server = _static_dirs[(base, index)] = StaticDir(base, index)
        segments = (req.path_info[len(section):] if section != "/" else req.path_info).split("/")[1:]
        return server._serve(segments[:-1] if segments[-1:] == [""] else segments, content_types)
    _static_answer(match, serve)


def _staticfile(filename: str, root: str = None, match: str = "", content_types: dict = None,
                debug: bool = False):
    """tools.staticfile: answer with one file."""
    _static_answer(match, lambda req: _serve_typed(_static_root(filename, root, "tools.staticfile.filename"),
                                                   content_types))


def _static_answer(match: str, serve) -> None:
    req = _local.request
    if match and not re.search(match, req.path_info):
        return
    try:
        _local.response.body = serve(req)
    except NotFound:
        return  # left to the handler
    req.handler = None


tools.staticdir = Tool("before_handler", _staticdir)
tools.staticfile = Tool("before_handler", _staticfile)


# -- uploads (multipart/form-data, streamed) ----------------------------------

_BLOCK = 256 * KiB  # the body is read in blocks of this size, never by lines
_PARAM = _Lazy(r';[ \t]*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^; \t]*)[ \t]*')


class Part:
    """An uploaded file in ``request.params``: ``file`` (at 0) is in memory up to
    request.upload_spool_size, then a temporary file deleted when the request ends (or, in a
    body the server spooled to disk, a read-only window on that stretch of it)."""

    def __init__(self, name: str, filename: str, content_type: str, spool_size: int):
        self.name, self.filename, self.content_type = name, filename, content_type
        self.file, self.size, self._spool, self._temp = io.BytesIO(), 0, spool_size, None

    @property
    def safe_filename(self) -> str:
        """The filename without directory or drive parts and control characters; '' if none is left."""
        name = re.split(r"[/\\]", self.filename)[-1]
        name = re.sub(r"[\x00-\x1f\x7f:]", "_", name).strip(" ")
        return "" if name in ("", ".", "..") else name

    def _write(self, data) -> None:
        try:
            if self._temp is None and self.size + len(data) > self._spool:
                import tempfile
                fd, self._temp = tempfile.mkstemp(prefix="minipub-upload-")
                memory, self.file = self.file, os.fdopen(fd, "w+b")
                self.file.write(memory.getbuffer())
            self.file.write(data)
        except OSError as exc:
            self._spool_failed(exc)
        self.size += len(data)

    def _window(self, spool, start: int, size: int) -> None:
        """The content is bytes ``start`` to ``start + size`` of the spooled body ``spool``."""
        small = size <= self._spool
        self.file = io.BytesIO(os.pread(spool.fileno(), size, start)) if small else \
            io.BufferedReader(_Window(spool, start, size), _BLOCK)
        self.size = size

    def _rewind(self) -> None:
        try:
            self.file.seek(0)  # flushes the temporary file: a full disk may show only now
        except OSError as exc:
            self._spool_failed(exc)

    def _spool_failed(self, exc: OSError):
        """The temporary directory is full (507) or unusable (503): say which, keep nothing."""
        self.close()
        raise _no_room(exc, "upload of %r" % (self.filename,)) from None

    def save(self, path: str) -> None:
        """Store the content at ``path``, with the mode ``open(path, "wb")`` would give it (the
        umask applies): a rename when the temporary file is on that filesystem."""
        import shutil
        if self._temp is not None:
            self.file.flush()
            # mkstemp's 0600 is right in a shared temporary directory, not at
            # ``path``: take the mode open() gives there (reading the umask
            # means setting it, which would race other threads).
            with open(path, "ab") as probe:
                mode = os.fstat(probe.fileno()).st_mode & 0o7777
            try:
                os.chmod(self._temp, mode)
                os.replace(self._temp, path)
                self._temp = None  # it is the caller's file now
                return
            except OSError as exc:
                import errno
                if exc.errno != errno.EXDEV:
                    raise
        self.file.seek(0)
        with open(path, "wb") as out:
            shutil.copyfileobj(self.file, out, _BLOCK)
        self.file.seek(0)

    def close(self) -> None:
        """Close the content and delete its temporary file (done when the request ends)."""
        try:
            self.file.close()  # may flush into a full disk: the file goes all the same
        except OSError:
            pass
        finally:
            if self._temp is not None:
                os.unlink(self._temp)
                self._temp = None


class _Blocks:
    """The body as a buffer refilled in fixed-size blocks."""

    def __init__(self, body):
        self.body, self.buf = body, bytearray(b"\r\n")  # so the first delimiter has its CRLF
        self.read = 0  # body bytes read into buf (the CRLF in front is not one of them)

    def tell(self) -> int:
        """Where in the body the next unconsumed byte is."""
        return self.read - len(self.buf)

    def need(self, n: int) -> None:
        while len(self.buf) < n:
            block = self.body.read(_BLOCK)
            if not block:
                raise HTTPError(400, "The multipart body ended early.")
            self.buf += block
            self.read += len(block)

    def until(self, marker: bytes, sink=None, limit: int = -1, error: HTTPError = None) -> int:
        """Feed the bytes before ``marker`` to ``sink`` (None discards), then drop the marker;
        how many bytes were before it."""
        buf, fed = self.buf, 0
        while True:
            at = buf.find(marker)  # else keep a tail that may be the start of ``marker``
            n = at if at >= 0 else max(0, len(buf) - len(marker) + 1)
            if 0 <= limit < fed + n:
                raise error
            if sink is not None:
                sink(buf[:n])
            if at >= 0:
                del buf[:at + len(marker)]
                return fed + at
            del buf[:n]
            fed += n
            self.need(len(buf) + 1)


def _boundary(content_type: str) -> bytes:
    boundary = _header_params(content_type)[1].get("boundary", "")
    # RFC 2046 5.1.1: boundary := 0*69<bchars> bcharsnospace
    if not re.fullmatch(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]", boundary):
        raise HTTPError(400, "Missing or invalid multipart boundary.")
    return boundary.encode("ascii")


def _header_params(value: str):
    """(the lowercased value before any ';', its parameters); 400 if they are malformed."""
    kind, params = value.partition(";")[0], {}
    end = len(kind)
    for match in _PARAM.finditer(value, end):
        if match.start() != end:
            break
        name, text = match.group(1).lower(), match.group(2)
        if text[:1] == '"':
            text = re.sub(r'\\(.)', r"\1", text[1:-1])
        params[name], end = text, match.end()
    if value[end:].strip(" \t;"):
        raise HTTPError(400, "Malformed header parameters: %r" % value[:80])
    return kind.strip(" \t").lower(), params


def _part_head(block: bytes):
    """(name, filename or None, content type) from the rest of a boundary line and a part's head."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("latin-1")
    padding, *lines = text.split("\r\n")  # the end of the boundary line, then the header lines
    if padding.strip(" \t"):  # RFC 2046 allows only transport-padding after the boundary
        raise HTTPError(400, "Malformed boundary line.")
    fields = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise HTTPError(400, "Malformed part header.")
        fields[name.strip(" \t").lower()] = value.strip(" \t")
    kind, params = _header_params(fields.get("content-disposition", ""))
    if kind != "form-data" or "name" not in params:
        raise HTTPError(400, "A form part needs Content-Disposition: form-data; name=...")
    filename = params.get("filename")
    if "filename*" in params:  # RFC 8187 ext-value: charset'lang'pct-encoded
        from urllib.parse import unquote
        charset, _, encoded = params["filename*"].partition("'")
        try:
            filename = unquote(encoded.partition("'")[2], charset or "utf-8", "strict")
        except (LookupError, UnicodeDecodeError):
            raise HTTPError(400, "Invalid filename* parameter.") from None
    # RFC 7578 4.4: Content-Type "defaults to 'text/plain'".
    return params["name"], filename, fields.get("content-type", "text/plain")


class _Window(io.RawIOBase):
    """Bytes ``start`` to ``start + size`` of an open file, read with os.pread (no shared offset):
    an uploaded file that lies inside a spooled request body.  It lives as long as that file."""

    def __init__(self, file, start: int, size: int):
        super().__init__()
        self.spool, self.start, self.size, self.pos = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = os.pread(self.spool.fileno(), max(0, min(len(buffer), self.size - self.pos)), self.start + self.pos)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset + (0, self.pos, self.size)[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos


def parse_multipart(req, content_type: str) -> dict:
    """Parse a multipart/form-data body as a stream into fields (str) and Parts; 413 past
    request.max_form_parts parts or request.max_form_field_size bytes of all non-file fields."""
    config, blocks, delimiter = req.app.config, _Blocks(req.body), b"\r\n--" + _boundary(content_type)
    parts = req.__dict__.setdefault("_uploads", [])  # Application closes them after the response
    pairs, budget = [], config["request.max_form_field_size"]
    # A body the server spooled to a temporary file (a large one): parts are windows on it, so a
    # 1 GiB upload is written to disk once, not twice (dirty pages past the kernel's threshold
    # make the second write as slow as the disk).
    spool = req.body if type(req.body) is io.BufferedRandom else None
    base = spool.tell() if spool is not None else 0
    try:
        blocks.until(delimiter)  # the preamble is ignored
        while True:
            blocks.need(2)
            if blocks.buf[:2] == b"--":
                break  # close-delimiter; the epilogue is ignored
            if len(pairs) >= config["request.max_form_parts"]:
                raise HTTPError(413, "Too many form parts.")
            head = bytearray()
            blocks.until(b"\r\n\r\n", head.extend, 16 * KiB, HTTPError(400, "Part header too large."))
            name, filename, ctype = _part_head(bytes(head))
            if filename is None:
                value = bytearray()
                blocks.until(delimiter, value.extend, budget, HTTPError(413, "Form fields too large."))
                budget -= len(value)
                try:
                    pairs.append((name, value.decode("utf-8")))
                except UnicodeDecodeError:
                    raise HTTPError(400, "Form field %r is not UTF-8." % name[:40]) from None
            else:
                part = Part(name, filename, ctype, config["request.upload_spool_size"])
                parts.append(part)
                if spool is not None:  # the file is that stretch of the spooled body, not a copy of it
                    start = base + blocks.tell()
                    part._window(spool, start, blocks.until(delimiter))
                else:
                    blocks.until(delimiter, part._write)
                    part._rewind()
                pairs.append((name, part))
        while req.body.read(_BLOCK):
            pass
    except BaseException:  # a refused or broken upload leaves no temporary file
        _release_uploads(req)
        raise
    return _pairs_to_dict(pairs)


def _release_uploads(req, body=None):
    """Close the request's Parts now, or for a streamed body when the server closes it."""
    parts = req.__dict__.pop("_uploads", ())

    def close():
        for part in parts:
            part.close()
    if body is None or isinstance(body, list):
        return close() or body
    return _on_close(body, close)


def _on_close(body, then):
    """``body`` whose close() (PEP 3333: the server calls it once the response is sent, or the
    client is gone) also runs ``then``."""
    inner = getattr(body, "close", None)

    def close():
        try:
            if inner is not None:
                inner()
        finally:
            then()
    if isinstance(body, FileWrapper):  # keep its type: the server sends it with sendfile()
        body.close = close
        return body
    return _ClosingBody(body, close)


class _ClosingBody:
    def __init__(self, chunks, close):
        self.chunks, self.close = chunks, close

    def __iter__(self):
        return iter(self.chunks)


# ===========================================================================
# Test client
# Contract: TestClient calls an application in-process, with no socket: each
# request becomes a PEP 3333 environ handed to the application through
# wsgiref.validate, so a test also checks that the application speaks valid
# WSGI.  The answer comes back whole as a TestResponse.  Cookies the
# application sets are sent back on later requests (by name only: Path and
# Domain are not matched); redirects to the same host are followed when asked.
# ===========================================================================

class TestResponse:
    """``status`` (int), ``headers`` (case-insensitive; a repeated field's values joined
    with ", "), ``fields`` (every field as sent), ``body`` (bytes), ``text`` and ``json()``."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, status: str, fields: list, body: bytes, url: str):
        self.status, self.reason = int(status[:3]), status[4:]
        self.fields, self.body, self.url = fields, body, url
        self.headers = HeaderDict()
        for name, value in fields:
            self.headers[name] = self.headers[name] + ", " + value if name in self.headers else value

    @property
    def text(self) -> str:
        """The body decoded with the Content-Type's charset (UTF-8 if none is given)."""
        charset = re.search(r';\s*charset="?([A-Za-z0-9._:-]+)', self.headers.get("Content-Type", ""), re.I)
        return self.body.decode(charset.group(1) if charset else "utf-8", "replace")

    def json(self):
        import json
        return json.loads(self.body)

    def __repr__(self):
        return "<TestResponse %d %s>" % (self.status, self.reason)


class TestClient:
    """Requests to an application without a server: ``TestClient(Root()).get("/").text``.

    ``app_or_root`` is a WSGI callable, or an object tree (a root class is
    instantiated) served by ``Application(root, config)``."""

    __test__ = False

    def __init__(self, app_or_root, config=None, *, follow_redirects: bool = False):
        app = app_or_root
        if not (isinstance(app, Application) or _is_wsgi(app)):
            app = Application(app() if isinstance(app, type) else app, config)
        self.app, self.follow_redirects, self.cookies = app, follow_redirects, {}

    def request(self, method: str, path: str, *, params=None, data=None, json=None, headers=None, files=None,
                follow_redirects: bool = None) -> TestResponse:
        """``params`` extend the query string; the body is ``data`` (a dict or pairs: a form;
        bytes or str: as is), ``json``, or ``files`` ({name: (filename, content[, type])}
        or file objects, with ``data`` as the other fields) sent as multipart/form-data."""
        from urllib.parse import urlencode, urlsplit
        body, content_type = _request_body(data, json, files)
        headers = list(headers.items() if isinstance(headers, dict) else headers or ())
        if content_type and not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", content_type))
        if params:
            path += ("&" if "?" in path else "?") + urlencode(params, doseq=True)
        response = self.send(method, path, headers, body)
        follow = self.follow_redirects if follow_redirects is None else follow_redirects
        host = dict((n.lower(), v) for n, v in headers).get("host", "localhost")
        for _ in range(10 if follow else 0):
            url = urlsplit(response.headers.get("Location", ""))
            if response.status not in (301, 302, 303, 307, 308) or not url.path or url.netloc not in ("", host):
                return response
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                # RFC 9110 15.4.4: a 303 is followed with GET (or HEAD); browsers do the same for a POST's 301/302
                method, body = "HEAD" if method == "HEAD" else "GET", b""
                headers = [(n, v) for n, v in headers if n.lower() not in ("content-type", "content-length")]
            response = self.send(method, url.path + ("?" + url.query if url.query else ""), headers, body)
        if follow and response.status in (301, 302, 303, 307, 308):
            raise RuntimeError("more than 10 redirects, the last to %s" % response.headers.get("Location"))
        return response

    get = partialmethod(request, "GET")
    head = partialmethod(request, "HEAD")
    post = partialmethod(request, "POST")
    put = partialmethod(request, "PUT")
    patch = partialmethod(request, "PATCH")
    delete = partialmethod(request, "DELETE")
    options = partialmethod(request, "OPTIONS")

    def send(self, method: str, target: str, headers=(), body: bytes = b"") -> TestResponse:
        """The core: one request as given (``headers`` are (name, value) pairs), no redirects followed."""
        from urllib.parse import quote
        from wsgiref.validate import validator
        target = quote(target, safe="".join(map(chr, range(0x21, 0x7f))))  # what a client puts on the wire
        path, _, query = target.partition("?")
        environ = {
            "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": _unquote(path), "QUERY_STRING": query,
            "REQUEST_URI": target, "RAW_URI": target, "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "localhost",
            "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000", "HTTP_HOST": "localhost",
            "CONTENT_LENGTH": str(len(body)), "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": False,
            "wsgi.multiprocess": False, "wsgi.run_once": False, "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,
        }
        fields = list(headers)
        if self.cookies:
            fields.append(("Cookie", "; ".join("%s=%s" % cookie for cookie in self.cookies.items())))
        for name, value in fields:
            key = _env_key(name)
            if key in environ and key.startswith("HTTP_") and key != "HTTP_HOST":  # repeated: joined as the server does
                value = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + value
            environ[key] = value
        started, chunks = [], []

        def start_response(status, fields, exc_info=None):
            started[:] = status, fields
            return chunks.append
        result = validator(self.app)(environ, start_response)
        try:
            chunks.extend(result)
        finally:
            result.close()
        status, fields = started
        self._keep_cookies(fields)
        bodiless = method == "HEAD" or status[:3] in ("204", "304") or status[0] == "1"
        return TestResponse(status, fields, b"" if bodiless else b"".join(chunks), target)

    def _keep_cookies(self, fields) -> None:
        for name, value in fields:
            if name.lower() != "set-cookie":
                continue
            pair, *attributes = value.split(";")
            cookie, _, cookie_value = pair.strip(" \t").partition("=")
            attrs = {k.strip(" \t").lower(): v.strip(" \t") for k, _, v in (a.partition("=") for a in attributes)}
            max_age = attrs.get("max-age", "")
            if re.fullmatch(r"-?[0-9]+", max_age):  # RFC 6265 5.3: Max-Age wins over Expires
                gone = int(max_age) <= 0
            else:  # an unreadable Expires keeps the cookie, as browsers do
                expires = _http_time(attrs.get("expires"))
                gone = expires is not None and expires <= time.time()
            if gone:
                self.cookies.pop(cookie, None)
            else:
                self.cookies[cookie] = cookie_value


def _is_wsgi(obj) -> bool:
    """A callable that is not an object tree and takes (environ, start_response)."""
    if not callable(obj) or hasattr(obj, "index") or hasattr(obj, "default") or _exposed(obj):
        return False
    import inspect
    try:
        inspect.signature(obj).bind({}, None)
    except TypeError:
        return False
    except ValueError:
        pass  # no signature to read (a builtin or C extension): trust it
    return True


def _request_body(data, json_value, files) -> tuple:
    """(body bytes, Content-Type or None) for TestClient.request."""
    if json_value is not None:
        import json
        return json.dumps(json_value).encode("utf-8"), "application/json"
    if files:
        return _multipart_body(data, files)
    if isinstance(data, (dict, list, tuple)):
        from urllib.parse import urlencode
        return urlencode(data, doseq=True).encode("ascii"), "application/x-www-form-urlencoded"
    return (data.encode("utf-8") if isinstance(data, str) else data or b""), None


def _multipart_body(data, files) -> tuple:
    boundary = "minipub-" + os.urandom(12).hex()

    def quoted(text):
        if "\r" in text or "\n" in text:
            raise ValueError("a form field or file name may not contain CR or LF: %r" % text)
        return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')

    def part(name, content, filename=None, content_type=None):
        head = "--%s\r\nContent-Disposition: form-data; name=%s" % (boundary, quoted(name))
        head += "; filename=%s\r\nContent-Type: %s" % (quoted(filename), content_type) if filename is not None else ""
        content = content.read() if hasattr(content, "read") else content
        content = content if isinstance(content, bytes) else str(content).encode("utf-8")
        return (head + "\r\n\r\n").encode("utf-8") + content
    parts = [part(name, value) for name, value in _form_items(data)]
    for name, spec in _form_items(files):
        if not isinstance(spec, tuple):  # a file object, or bytes
            spec = (os.path.basename(getattr(spec, "name", name)), spec)
        filename, content, content_type = (spec + ("application/octet-stream",))[:3]
        parts.append(part(name, content, filename, content_type))
    body = b"\r\n".join(parts) + b"\r\n--%s--\r\n" % boundary.encode("ascii")
    return body, "multipart/form-data; boundary=" + boundary


# ===========================================================================
# Engine, reloader and processes
# Contract: minipub.engine is the process's life.  Callbacks subscribed to
# "start" run before the server accepts (one that fails stops startup with one
# line and exit status 2), "stop" after it has drained, then "exit";
# "graceful" on demand.  engine.start() serves minipub.tree in background
# threads, engine.block() waits without polling (an idle process makes no
# wake-ups) until Ctrl-C, SIGTERM or engine.exit().  The command line and
# quickstart() run the same callbacks around Server.serve_forever().
# ===========================================================================

class _StartError(Exception):
    """A start callback failed: the process does not serve."""


class _Tasks:
    """Callables due every so many seconds.  step() runs the due ones and says how long until the
    next is due (None: none registered), so whoever runs them sleeps exactly that long: no tick."""

    def __init__(self, clock=time.monotonic):
        self.clock, self.entries, self.stopped = clock, [], True  # entries: [due, interval, callable]

    @cached_property
    def wake(self):  # made at first use: minipub.engine is built at import, before threading is
        return threading.Event()

    def add(self, interval: float, func) -> None:
        if not interval > 0:
            raise ValueError("a task's interval must be positive, not %r" % (interval,))
        self.entries.append([self.clock() + interval, float(interval), func])
        self.wake.set()

    def step(self):
        for entry in list(self.entries):
            now = self.clock()
            if entry[0] <= now:
                entry[0] += entry[1]
                if entry[0] <= now:  # far behind (a slow run, a suspended machine): no burst of runs
                    entry[0] = now + entry[1]
                try:
                    entry[2]()
                except Exception:  # a task's failure is logged; it runs again when next due
                    _logger().exception("engine task %r failed", entry[2])
        return max(0.0, min(e[0] for e in self.entries) - self.clock()) if self.entries else None

    def run(self) -> None:
        """The body of the engine's task thread, until stop(); add() and stop() wake it."""
        while not self.stopped:
            self.wake.clear()  # before step(): a task added from now on cuts the wait short
            timeout = self.step()
            if not self.stopped:
                self.wake.wait(timeout)

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()


class Engine:
    """``minipub.engine``: subscribe(channel, callback, priority), task, start, block, stop, exit."""

    CHANNELS = ("start", "stop", "graceful", "exit")

    def __init__(self):
        self.state, self.server = "STOPPED", None
        self._subscribers = {channel: [] for channel in self.CHANNELS}
        self.tasks, self._task_thread = _Tasks(), None

    def task(self, interval: float, func) -> None:
        """Call ``func()`` every ``interval`` seconds while the engine is started (CherryPy's
        BackgroundTask), in one thread for all tasks that sleeps until the next is due; an exception
        is logged and the task runs again.  In each worker process when there are several."""
        self.tasks.add(interval, func)
        if self.state == "STARTED":
            self._start_tasks()

    def _start_tasks(self) -> None:
        if self.tasks.entries and self._task_thread is None:
            self.tasks.stopped = False
            self._task_thread = threading.Thread(target=self.tasks.run, name="minipub-tasks", daemon=True)
            self._task_thread.start()

    def _stop_tasks(self) -> None:
        if self._task_thread is not None:
            self.tasks.stop()
            if self._task_thread is not threading.current_thread():
                self._task_thread.join()
            self._task_thread = None

    def subscribe(self, channel: str, callback, priority: int = 50) -> None:
        if channel not in self._subscribers:
            raise ValueError("unknown engine channel %r; use one of %s" % (channel, ", ".join(self.CHANNELS)))
        self._subscribers[channel].append((priority, len(self._subscribers[channel]), callback))

    def unsubscribe(self, channel: str, callback) -> None:
        self._subscribers[channel] = [s for s in self._subscribers.get(channel, ()) if s[2] is not callback]

    def publish(self, channel: str, *args) -> list:
        """Run ``channel``'s callbacks in priority order; stop/exit/graceful log a failure and go on."""
        results = []
        for _, _, callback in sorted(self._subscribers[channel], key=lambda s: s[:2]):
            try:
                results.append(callback(*args))
            except Exception as exc:
                if channel == "start":
                    raise _StartError("engine start callback %s failed: %s" % (
                        getattr(callback, "__qualname__", callback), _where(exc))) from exc
                _logger().exception("engine %s callback %r failed", channel, callback)
        return results

    def _begin(self, server) -> None:
        self.publish("start")
        self.server, self.state = server, "STARTED"
        self._start_tasks()

    def start(self) -> None:
        """Run the start callbacks, then serve minipub.tree in background threads."""
        if self.state == "STARTED":
            return
        settings = _limits(config)
        configure_logging(settings)
        server = _server_for(tree, settings, _listen_socket(settings))
        try:
            self._begin(server)
        except _StartError:
            server._sock.close()
            raise
        server.start()
        _announce(server)

    def block(self) -> None:
        """Wait for Ctrl-C, SIGTERM or exit() without polling, then exit()."""
        if self.state == "STARTED" and self.server is not None:
            # The server's own handlers: a signal drains it, and its watch thread then ends.
            restore = self.server._install_signals()
            try:
                self.server._thread.join()
            finally:
                restore()
        self.exit()

    def stop(self) -> None:
        """Stop serving (in-flight requests finish), then run the stop callbacks."""
        if self.server is not None:
            self.server.stop()
        self._stop_tasks()
        if self.state == "STARTED":
            self.state = "STOPPED"
            self.publish("stop")

    def graceful(self) -> None:
        self.publish("graceful")

    def exit(self) -> None:
        self.stop()
        if self.state != "EXITED":
            self.state = "EXITED"
            self.publish("exit")


engine = Engine()


# -- the supervisor: worker processes and the reloader ------------------------------
# With server.workers = N > 1 or engine.autoreload.on a supervising parent
# owns the listening socket and runs the application in N child processes
# (subprocess: fresh interpreters, never a fork of a threaded one) that all
# accept on it; the parent has no thread and, unless reloading or watched by
# systemd, no timeout.  A child that dies is restarted with backoff; SIGHUP
# replaces the children one at a time, like a reload; SIGTERM drains them all.
# The parent polls the files the child reported (modules it loaded outside
# the standard library and site-packages, plus engine.autoreload.files), one
# wake-up per engine.autoreload.frequency; the child makes none.  On a change
# a new child starts on the same socket; only once it has imported the app
# and says "ready" does the old one get SIGTERM (stop accepting, finish what
# is in flight, exit), so no connection is ever refused.  A child that fails
# to import reports file, line and error once; the old child keeps serving,
# or, if there is none, the failed child serves that error as a 500 page.
# Reloader off: none of this runs.

_RELOAD_ENV = "MINIPUB_RELOADER"
_CHILD = None  # in a reloader child: {"chan", "sock", "error", "files", "ready"}


def _mtime(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None  # deleted (or mid-save): a change too
    return st.st_mtime_ns, st.st_size


class Poller:
    """The mtimes of a set of files; each step() says which changed since the last."""

    def __init__(self, files=()):
        self.mtimes = {}
        self.watch(files)

    def watch(self, files) -> None:
        """Add paths; a dict also gives each one's _mtime() as seen earlier (by a child)."""
        seen = files if isinstance(files, dict) else {path: _mtime(path) for path in files}
        for path, mtime in seen.items():
            self.mtimes.setdefault(path, tuple(mtime) if mtime else None)

    def step(self) -> list:
        now = {path: _mtime(path) for path in self.mtimes}
        changed = [path for path, old in self.mtimes.items() if now[path] != old]
        self.mtimes = now
        return changed


def _source_files(paths) -> list:
    """The absolute ``paths`` that are not part of Python or of installed packages."""
    stdlib = os.path.dirname(os.__file__) + os.sep
    paths = [os.path.abspath(p) for p in paths if p and not p.startswith("<")]  # "<frozen ...>"
    return [p for p in paths if not p.startswith(stdlib)
            and not {"site-packages", "dist-packages"}.intersection(p.split(os.sep))]


def _module_files(modules=None) -> list:
    """Files of the loaded modules worth watching; never walks sys.path."""
    modules = list(sys.modules.values()) if modules is None else modules
    return _source_files(getattr(m, "__file__", None) for m in modules)


def _error_files(exc: BaseException) -> list:
    """The files a failed import went through: fixing any of them may fix it."""
    import traceback
    paths = [exc.filename] if isinstance(exc, SyntaxError) else []
    paths += [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
    return _source_files(paths)


def _interpreter_args() -> list:
    """The options this interpreter was started with (-X dev, -W error, -O ...)."""
    orig = getattr(sys, "orig_argv", None)
    if orig is None:  # 3.9: rebuilt from sys.flags, sys.warnoptions, sys._xoptions
        import subprocess
        return subprocess._args_from_interpreter_flags()
    options = orig[1:len(orig) - len(sys.argv)]
    return options[:-1] if options[-1:] == ["-m"] else options


def _how_started() -> list:
    """How a child reruns this program: ["module", name] for -m, else ["path", script]."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return ["module", spec.name]
    if not getattr(main, "__file__", None):
        raise ConfigError("engine.autoreload.on needs a script or -m module, not an interactive session")
    return ["path", os.path.abspath(main.__file__)]


class _Supervisor:
    """The parent: owns the socket, keeps one serving child per slot (server.workers), replaces
    them one at a time (a change, SIGHUP), restarts one that dies with backoff, stops them all."""

    def __init__(self, config: dict, sock, run: list):
        self.config, self.sock, self.run = config, sock, run
        self.reloading = config["engine.autoreload.on"]
        self.poller = Poller(_source_files(config["engine.autoreload.files"]))
        self.slots = [None] * config["server.workers"]  # the serving child of each slot
        self.children, self.starting, self.queue = [], {}, []  # every live child; slot -> new one; to replace
        self.restart_at, self.failures = {}, [0] * len(self.slots)
        self.secret = os.urandom(32).hex()  # tools.auth_digest's nonce secret, the same in every child
        self.tasks, self.status, self.announced = _Tasks(), 0, False
        self._stopping = self._hup = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        if self.reloading:
            self.tasks.add(max(config["engine.autoreload.frequency"], 0.05), self.tick)  # 0 would spin
        _watch_systemd(self.tasks.add)

    def spawn(self, slot: int) -> None:
        import json
        import subprocess
        from types import SimpleNamespace
        ours, theirs = socket.socketpair()
        old = self.slots[slot]
        state = {"run": self.run, "argv": sys.argv, "sock": self.sock.fileno(), "chan": theirs.fileno(),
                 "config": self.config, "secret": self.secret,
                 # reloading with nothing good to keep serving: on failure this child serves the error
                 "fallback": self.reloading and (old is None or old.broken)}
        env = dict(os.environ, **{_RELOAD_ENV: json.dumps(state)})
        argv = [sys.executable] + _interpreter_args() + [os.path.abspath(__file__)]
        try:  # no thread runs in this process, and subprocess execs at once: no fork with threads
            proc = subprocess.Popen(argv, env=env, pass_fds=(self.sock.fileno(), theirs.fileno()))
        finally:
            theirs.close()
        child = SimpleNamespace(proc=proc, chan=ours, buffer=b"", broken=False, slot=slot, born=time.monotonic())
        self.starting[slot] = child
        self.children.append(child)

    def run_forever(self) -> int:
        import signal
        restore = Server._install_signals(self)  # the same handlers: set _stopping, _wake()
        hup = signal.signal(signal.SIGHUP, self._on_hup)
        try:
            for slot in range(len(self.slots)):
                self.spawn(slot)
            while not self._stopping:
                waits = [self.tasks.step()] + [at - time.monotonic() for at in self.restart_at.values()]
                waits = [max(0.0, wait) for wait in waits if wait is not None]
                chans = [self._wake_r] + [c.chan for c in self.children]
                readable = select.select(chans, [], [], min(waits) if waits else None)[0]  # idle: no timeout
                if self._wake_r in readable:
                    self._wake_r.recv(64)
                for child in [c for c in self.children if c.chan in readable]:
                    self.receive(child)
                self.housekeeping()
        finally:
            _notify("STOPPING=1")
            signal.signal(signal.SIGHUP, hup)
            self.stop_all()
            restore()
        return self.status

    def _on_hup(self, signum, frame):
        self._hup = True
        self._wake()

    def housekeeping(self):
        """After each wake-up: SIGHUP, due restarts, the next replacement, READY=1 once all serve."""
        if self._hup and not self._stopping:
            self._hup = False
            _logger().info("SIGHUP: replacing the %d worker process(es) one at a time", len(self.slots))
            self.replace_all()
        for slot, at in list(self.restart_at.items()):
            if at <= time.monotonic() and not self._stopping:
                del self.restart_at[slot]
                self.spawn(slot)
        if self.queue and not self.starting and not self._stopping:
            self.spawn(self.queue.pop(0))
        if not self.announced and not self.starting and not self.queue and all(self.slots):
            self.announced = True
            _notify("READY=1")

    def replace_all(self):
        _notify("RELOADING=1", "MONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
        for child in self.starting.values():
            child.proc.terminate()  # still importing older code: replaced too
        self.starting.clear()
        self.queue, self.announced = list(range(len(self.slots))), False

    def tick(self):
        changed = self.poller.step()
        if changed:
            _logger().info("reloader: %s changed; starting a new process", changed[0])
            self.replace_all()

    def receive(self, child):
        import json
        data = child.chan.recv(65536)
        if not data:
            return self.reap(child)
        child.buffer += data
        while b"\n" in child.buffer:
            line, _, child.buffer = child.buffer.partition(b"\n")
            self.message(child, json.loads(line))

    def message(self, child, msg):
        self.poller.watch(msg["files"])
        if self.starting.get(child.slot) is not child:
            return  # superseded while it was importing; it has been told to stop
        del self.starting[child.slot]
        if msg["ready"]:
            child.broken = bool(msg["error"])
            old, self.slots[child.slot] = self.slots[child.slot], child
            if old is not None:
                old.proc.terminate()  # SIGTERM: stop accepting, finish in-flight requests
        if not msg["error"]:
            return
        if self.reloading:
            _logger().error("reloader: cannot load the application: %s; %s", msg["error"],
                            "serving an error page until it is fixed" if msg["ready"]
                            else "the previous version keeps serving")
            if not msg["ready"]:
                self.queue.clear()  # the others would fail alike
        elif not any(self.slots):  # nothing serves: the one-line error of a single process
            print("minipub: error: %s" % msg["error"], file=sys.stderr)
            self.status, self._stopping = 2, True
        else:
            self.backoff(child, "cannot load the application: %s" % msg["error"])

    def reap(self, child):
        child.chan.close()
        self.children.remove(child)
        status = child.proc.wait()
        if self.starting.get(child.slot) is child:
            del self.starting[child.slot]
            if self.reloading and self.slots[child.slot] is not None:
                _logger().error("reloader: the new process exited with status %s before it was ready", status)
                self.queue.clear()  # the old version keeps serving until the next change
            else:
                self.backoff(child, "exited with status %s before it was ready" % status)
        elif self.slots[child.slot] is child and not self._stopping:
            self.slots[child.slot] = None
            self.backoff(child, "exited with status %s" % status)

    def backoff(self, child, why: str):
        """Restart the slot soon; 0.1 s doubling to 10 s while its processes keep dying young."""
        young = time.monotonic() - child.born < 30.0
        failures = self.failures[child.slot] = self.failures[child.slot] + 1 if young else 0
        delay = min(10.0, 0.05 * 2 ** failures)
        _logger().error("worker process %d (pid %d) %s; restarting in %.2gs", child.slot, child.proc.pid, why, delay)
        self.restart_at[child.slot] = time.monotonic() + delay

    _wake = Server._wake

    def stop_all(self):
        """SIGTERM every child, wait for their in-flight requests, then SIGKILL stragglers."""
        import subprocess
        self._stopping = True
        for child in self.children:
            child.proc.terminate()  # skipped for one already reaped
        deadline = time.monotonic() + self.config["server.shutdown_timeout"] + 2.0
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            child.chan.close()
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()


def _supervise(config: dict, sock, run: list) -> int:
    """Run the supervising parent on ``sock`` until Ctrl-C or SIGTERM; the exit status."""
    if config["engine.autoreload.on"]:
        _logger().info("reloader: watching for changes every %gs", config["engine.autoreload.frequency"])
    if config["server.workers"] > 1:
        _logger().info("minipub %s: %d worker processes (pid %d supervises; SIGHUP replaces them)",
                       __version__, config["server.workers"], os.getpid())
    return _Supervisor(config, sock, run).run_forever()


def _child_ready(ready: bool = True) -> None:
    """Report to the parent: serve() calls this in a child once its server is set up,
    _child_failed() with ready=False when the old generation should keep serving."""
    import json
    files = _module_files() + _CHILD["files"]
    msg = {"ready": ready, "error": _CHILD["error"], "files": {f: _mtime(f) for f in files}}
    _CHILD["chan"].sendall(json.dumps(msg).encode("utf-8") + b"\n")
    _CHILD["ready"] = ready


def _lifeline(chan):
    # The parent never writes; EOF means it is gone (even SIGKILLed): stop too.
    try:
        while chan.recv(1):
            pass
    except OSError:
        pass
    import signal
    os.kill(os.getpid(), signal.SIGTERM)


def _reload_child() -> int:
    """A reloader child's entry point: run the program on the parent's socket."""
    global _CHILD, _NONCE_SECRET, _MULTIPROCESS
    import json
    import runpy
    state = json.loads(os.environ.pop(_RELOAD_ENV))
    chan = socket.socket(fileno=state["chan"])
    chan.set_inheritable(False)  # the app's own subprocesses must not keep it open
    _CHILD = {"chan": chan, "sock": state["sock"], "error": None, "files": [], "ready": False}
    _NONCE_SECRET, _MULTIPROCESS = bytes.fromhex(state["secret"]), state["config"]["server.workers"] > 1
    threading.Thread(target=_lifeline, args=(chan,), name="minipub-lifeline", daemon=True).start()
    config = make_config()  # the parent's settings, tools.* and the like included
    config.update(_checked(state["config"]))
    sys.argv[:] = state["argv"]
    # A .pyc is trusted when the source's size and mtime in whole seconds match:
    # two saves within one second would load stale code.  Children never write one.
    sys.dont_write_bytecode = True
    how, what, *sections = state["run"]
    try:
        if how == "target":  # sections: the --config file's path sections, for the application
            configure_logging(config)
            serve(load_target(what, dict(config, **(sections[0] if sections else {}))), config)
        elif how == "module":
            sys.path[0] = os.getcwd()  # what -m puts there
            runpy.run_module(what, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(what)
            runpy.run_path(what, run_name="__main__")
    except KeyboardInterrupt:
        return 130
    except (Exception, SystemExit) as exc:
        if _CHILD["ready"]:
            raise  # it failed after serving: ordinary error handling
        return _child_failed(exc, config, state["fallback"])
    return 0


def _child_failed(exc: BaseException, config: dict, fallback: bool) -> int:
    cause = exc.__context__ if isinstance(exc, _TargetError) and exc.__context__ else exc
    if isinstance(exc, SystemExit):
        error = "the program exited (status %s) before serving" % (exc.code,)
    else:
        error = str(exc) if isinstance(exc, _TargetError) else _where(exc)
    _CHILD["error"], _CHILD["files"] = error, _module_files() + _error_files(cause)
    if not fallback:
        _child_ready(False)
        return 1
    import traceback
    trace = traceback.format_exception(type(cause), cause, cause.__traceback__)
    detail = "".join(trace) if config["request.show_tracebacks"] else None
    page = error_page(500, "The application failed to load: %s" % error, detail)

    def error_app(environ, start_response):
        start_response("500 Internal Server Error", _ERROR_HEADERS + [("Cache-Control", "no-store")])
        return [page]
    configure_logging(config)
    serve(error_app, config)
    return 0


# -- deployment: systemd, pid file, daemon, privileges -----------------------------
# What the process that owns the listening socket (the single server, or the
# supervising parent of workers) does once bound and before any request, in
# this order: detach (engine.daemonize), write engine.pidfile, switch user
# (engine.user); at exit it removes the pid file and the socket file it made.
# systemd hears READY=1, RELOADING=1, STOPPING=1 and, only when the unit sets
# WatchdogSec, WATCHDOG=1 from that process; workers stay silent.

def _notify(*lines: str) -> None:
    """sd_notify(3): one datagram to $NOTIFY_SOCKET ("@name": the abstract namespace); else nothing."""
    where = os.environ.get("NOTIFY_SOCKET", "")
    if not where or _CHILD is not None:
        return
    address = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto("\n".join(lines).encode("utf-8"), address)
        except OSError as exc:
            _logger().warning("cannot notify systemd at %s: %s", where, exc)


def _watch_systemd(add_task) -> None:
    """sd_watchdog_enabled(3): WATCHDOG_USEC set (and WATCHDOG_PID ours, if set): send WATCHDOG=1
    twice per period, as systemd recommends.  Unset: no task, no wake-ups."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", str(os.getpid()))
    if usec.isdigit() and int(usec) > 0 and pid == str(os.getpid()) and _CHILD is None:
        add_task(int(usec) / 2e6, lambda: _notify("WATCHDOG=1"))


def _claim_process(config: dict, sock):
    """Daemonize, write the pid file and drop privileges as configured; returns the undo for exit."""
    if config["engine.daemonize"]:
        _daemonize()
    pidfile = config["engine.pidfile"]
    if pidfile:
        _write_pidfile(pidfile)
    _drop_privileges(config, sock)
    pid = str(os.getpid())

    def undo():
        if pidfile:
            _remove_ours(pidfile, lambda: open(pidfile).read().strip() == pid)
        for path, inode in list(_SOCKET_FILES.items()):
            _remove_ours(path, lambda: os.stat(path).st_ino == inode)  # not one a later run made
            del _SOCKET_FILES[path]
    return undo


def _remove_ours(path: str, ours) -> None:
    try:
        if ours():
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. in a directory only root may write, after dropping privileges
        _logger().warning("cannot remove %s: %s", path, exc)


def _daemonize() -> None:
    """engine.daemonize: fork, setsid, fork again (so the daemon can never regain a terminal), stdio
    to /dev/null.  Only before any thread: a forked copy of a threaded process lacks those threads."""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        raise ConfigError("engine.daemonize: threads already run (%s); detaching would lose them" % ", ".join(others))
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _write_pidfile(path: str) -> None:
    """engine.pidfile: refused while the process it names lives; a stale one is replaced."""
    try:
        with open(path) as f:
            old = f.read().strip()
    except FileNotFoundError:
        old = None
    if old is not None:
        if old.isdigit() and int(old) != os.getpid() and _alive(int(old)):
            raise ConfigError("engine.pidfile %s: process %s is running; stop it first" % (path, old))
        os.unlink(path)
    try:
        with open(path, "x") as f:  # exclusive: of two starting at once, one wins
            f.write("%d\n" % os.getpid())
    except OSError as exc:
        raise ConfigError("cannot write engine.pidfile %s: %s" % (path, exc.strerror)) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _drop_privileges(config: dict, sock) -> None:
    """CherryPy's DropPrivileges: bound (port 80 needs root), switch to engine.user before serving
    any request; never go on as root after being asked to drop."""
    user, group = config["engine.user"], config["engine.group"]
    if not user:
        if group:
            raise ConfigError("engine.group needs engine.user")
        return
    import grp
    import pwd
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        gid = (int(group) if group.isdigit() else grp.getgrnam(group).gr_gid) if group else entry.pw_gid
    except KeyError:
        raise ConfigError("engine.user %r / engine.group %r: no such user or group" % (user, group)) from None
    uid = entry.pw_uid
    if os.geteuid() == 0:
        for path in _SOCKET_FILES:
            os.chown(path, uid, gid)  # socket_file_mode then means this user and group
        os.initgroups(entry.pw_name, gid)  # the user's supplementary groups, not root's
        os.setgid(gid)
        os.setuid(uid)  # real, effective and saved: there is no way back
    elif (os.getuid(), os.getgid()) != (uid, gid):
        raise ConfigError("engine.user %s: only root can switch user (this is uid %d)" % (user, os.getuid()))
    os.umask(config["engine.umask"])
    if uid != 0 and 0 in (os.getuid(), os.geteuid()):
        raise ConfigError("still root after switching to engine.user %s: refusing to serve" % user)


# ===========================================================================
# Command line, logging and quickstart
# Contract: ``python minipub.py MODULE:ATTR`` (or the installed ``minipub``)
# imports the target from the current directory and serves it; every mistake
# found before serving (a usage error, a bad setting or INI file, a target
# that cannot be imported, made or served) gets one line on stderr, plus a
# pointer to --help for usage errors, and exit status 2.  Options come from LIMITS.
# ===========================================================================

def configure_logging(config: dict) -> None:
    """Error and access logs from the log.* keys (loggers minipub.error, minipub.access)."""
    import logging
    # The format belongs to the process-wide logger, not to one Server, so
    # every Server in the process writes the same kind of access line.
    access = {"common": "%(message)s", "combined": '%(message)s "%(referer)s" "%(user_agent)s"'}
    formats = {"error": "[%(asctime)s] %(levelname)s %(message)s", "access": access[config["log.access_format"]]}
    for name, file_key in (("error", "log.error_file"), ("access", "log.access_file")):
        logger = logging.getLogger("minipub." + name)
        for handler in [h for h in logger.handlers if getattr(h, "_minipub", False)]:
            logger.removeHandler(handler)
            handler.close()
        handlers = [logging.StreamHandler(sys.stderr)] if config["log.screen"] else []
        if config[file_key]:
            try:
                handlers.append(logging.FileHandler(config[file_key], encoding="utf-8"))
            except OSError as exc:  # else main() would report it as a port it cannot listen on
                raise ConfigError("cannot open %s %r: %s" % (file_key, config[file_key], exc.strerror or exc)) from None
        for handler in handlers:
            handler._minipub = True
            handler.setFormatter(logging.Formatter(formats[name]))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def quickstart(root=None, script_name: str = "", config=None) -> None:
    """Mount ``root`` on minipub.tree and serve the tree until Ctrl-C or SIGTERM.  ``config`` (a
    dict or an INI path) is the application's; its global part also updates minipub.config."""
    try:
        if config is not None:
            _PROCESS_CONFIG.update(_read_sections(config)[0])
        if root is not None:
            tree.mount(root, script_name, config)
        settings = _limits(_PROCESS_CONFIG)
        configure_logging(settings)
        status = serve(tree, settings)
    except (ConfigError, _StartError) as exc:
        print("minipub: error: %s" % exc, file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # the port is taken, the address is not ours, ...
        print("minipub: error: cannot listen: %s" % (exc.strerror or exc), file=sys.stderr)
        sys.exit(2)
    if status:
        sys.exit(status)


def serve(app, config: dict, sock=None, run: list = None) -> int:
    """Serve ``app`` on ``sock`` (default: the configured one) until Ctrl-C or SIGTERM; the exit
    status.  With server.workers > 1 or engine.autoreload.on this process supervises children that
    rerun ``run`` (default: this program as it was started) and serve on its socket."""
    if _CHILD is not None:  # a worker or reloader child: serve on the parent's socket
        return _serve_here(app, config, socket.socket(fileno=_CHILD["sock"]))
    sock = sock or _listen_socket(config)
    undo = _claim_process(config, sock)
    try:
        if config["engine.autoreload.on"] or config["server.workers"] > 1:
            return _supervise(config, sock, run or _how_started())
        return _serve_here(app, config, sock)
    finally:
        undo()


def _server_for(app, config: dict, sock) -> "Server":
    """The Server for ``app`` on ``sock``, with the server.* settings of ``config``."""
    return Server(app, config["server.socket_host"], config["server.socket_port"], sock=sock,
                  config=_limits(config))


def _announce(server, hint: str = "") -> None:
    """The startup line(s); ``hint`` (how to stop) ends the last."""
    urls = server.urls
    for i, url in enumerate(urls, 1):
        _logger().info("minipub %s serving on %s%s", __version__, url, hint if i == len(urls) else "")


def _serve_here(app, config: dict, sock) -> int:
    server = _server_for(app, config, sock)
    server._prepare()
    engine._begin(server)  # start callbacks: after binding, before accepting
    _watch_systemd(engine.task)
    # SIGTERM from now on drains: serve_forever() installs the same handlers only once it serves,
    # and whoever hears "ready" (a supervisor, systemd, a test) may signal at once.
    restore = server._install_signals()
    try:
        if _CHILD is not None:
            _child_ready()
        _notify("READY=1")
        _announce(server, "; Ctrl-C to quit")
        server.serve_forever()
    finally:
        restore()
        _notify("STOPPING=1")
        engine.exit()
    _logger().info("minipub stopped")
    return 0


class _TargetError(Exception):
    """The MODULE:ATTR given on the command line cannot be served."""


def load_target(spec: str, config: dict):
    """Import MODULE:ATTR from the current directory; a WSGI callable to serve."""
    import importlib
    module_name, attr = _split_target(spec)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = module = importlib.import_module(module_name)
    except Exception as exc:  # any failure at import: one clear line, not a traceback wall
        raise _TargetError("cannot import %s: %s" % (module_name, _where(exc))) from None
    _check_not_shadowed(module_name, module)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _TargetError("%s (%s) has no attribute %r" % (
                module_name, getattr(module, "__file__", None) or "built in", attr)) from None
    if isinstance(obj, type):
        obj = _instantiate(obj, module_name)
    if isinstance(obj, Application) or _is_wsgi(obj):
        return obj
    app = Application(obj, config)
    if not app.answers:
        raise _TargetError("%s has no exposed handler and is not a WSGI callable(environ, start_response): "
                           "mark its methods with @minipub.expose" % spec)
    return app


def _split_target(spec: str) -> tuple:
    """(MODULE, ATTR), or the _TargetError a typo in them deserves."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise _TargetError("target %r is not MODULE:ATTR (e.g. app:Root)" % spec)
    if module_name.endswith(".py"):
        raise _TargetError("target %r names a file: drop the .py (%s:%s)" % (spec, module_name[:-3], attr))
    return module_name, attr


def _check_not_shadowed(name: str, module) -> None:
    """A module of the standard library (or another installed one) imported instead of the app's file."""
    top = name.partition(".")[0]
    local = [p for p in (top + ".py", top) if os.path.exists(os.path.join(os.getcwd(), p))]
    found = sys.modules.get(top)
    imported = getattr(found, "__file__", None) or next(iter(getattr(found, "__path__", ())), None)  # namespace pkg
    if local and (imported is None or not os.path.abspath(imported).startswith(os.path.join(os.getcwd(), ""))):
        raise _TargetError("'import %s' loads %s, not your ./%s: that module shadows your app; rename your file"
                           % (top, imported or "the built-in module", local[0]))


def _instantiate(cls, module_name: str):
    """A root class made into its instance; one line if that cannot be done without arguments."""
    try:
        return cls()
    except Exception as exc:
        if not isinstance(exc, TypeError) or exc.__traceback__.tb_next:  # raised inside, not by the call
            raise _TargetError("%s() failed: %s" % (cls.__name__, _where(exc))) from None
        raise _TargetError("%s:%s cannot be created without arguments (%s): serve an instance instead, e.g. "
                           "root = %s(...) in %s and the target %s:root" % (
                               module_name, cls.__name__, exc, cls.__name__, module_name, module_name)) from None


def _where(exc: BaseException) -> str:
    """'ZeroDivisionError: division by zero (app.py, line 3)': the innermost line of the
    application's own code, never of minipub, the standard library or an installed package."""
    if isinstance(exc, SyntaxError):
        return "%s: %s (%s, line %s)" % (type(exc).__name__, exc.msg, exc.filename, exc.lineno)
    import traceback
    mine = os.path.abspath(__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if _source_files([f.filename]) not in ([], [mine])]
    text = "%s: %s" % (type(exc).__name__, exc)
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
        return want(text, 8) if _ROWS[key][2] == "mode" else want(text)  # a mode is octal: 660, 0o660
    except ValueError:
        raise ConfigError("--%s wants a %s, not %r" % (key, _ROWS[key][2], text)) from None


_CLI_ALIASES = {"host": "server.socket_host", "port": "server.socket_port", "threads": "server.thread_pool",
                "workers": "server.workers", "certfile": "server.ssl_certificate",
                "keyfile": "server.ssl_private_key"}


class _UsageError(Exception):
    """A command-line mistake found by argparse; main() prints it in one line."""


def _prog() -> str:
    """The installed command (and ``python -m minipub``) is minipub; a copied file runs by its path."""
    return "python %s" % os.path.basename(__file__) if __name__ == "__main__" and __spec__ is None else "minipub"


_CLI_FLAGS = {"config": "INI file with a [global] section of Python literals (and [/path] sections)",
              "reload": "alias of --engine.autoreload.on true", "version": "print the version and exit",
              "help": "print this help and exit"}


def _help() -> str:
    """--help: the aliases and flags, then every LIMITS row (key, unit, why, default)."""
    import textwrap
    lines = ["usage: %s [--help] [--version] [options] MODULE:ATTR" % _prog(), "",
             "Serve MODULE:ATTR (a class, an instance or a WSGI callable) over HTTP/1.1;",
             "MODULE is imported from the current directory, e.g. app:Root.", "", "options:"]
    rows = [("--%s %s" % (alias, _ROWS[key][2].upper()), "alias of --" + key)
            for alias, key in _CLI_ALIASES.items()]
    rows += [("--config FILE" if name == "config" else "--" + name, why) for name, why in _CLI_FLAGS.items()]
    rows += [("", ""), ("settings (the LIMITS table: key, default, why):", "")]
    rows += [("--%s %s" % (key, unit.upper()), "%s [default: %s]" % (why, oct(default) if unit == "mode" else
                                                                       repr(default)))
             for key, default, unit, why in LIMITS]
    for option, why in rows:
        lines.append("  " + option if why else option)
        lines += textwrap.wrap(why, 100, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines) + "\n"


def _parse_args(argv) -> dict:
    """The command line as {name: text} (a LIMITS key, an alias, target, config, reload, help,
    version); _UsageError naming the first mistake, and an unknown option's likely spelling.
    ``--option VALUE`` and ``--option=VALUE``; no abbreviations, so a typo is never another option."""
    values = dict.fromkeys(("target", "config", "help", "version", "reload", *_CLI_ALIASES, *_ROWS))
    words = list(sys.argv[1:] if argv is None else argv)
    while words:
        word = words.pop(0)
        name, eq, value = word[2:].partition("=")
        if word in ("--help", "-h", "--version", "--reload"):
            values["help" if word == "-h" else word[2:]] = True
        elif not word.startswith("-") and values["target"] is None:
            values["target"] = word
        elif not word.startswith("-"):
            raise _UsageError("unexpected argument %r" % word)
        elif eq and name in ("help", "version", "reload"):
            raise _UsageError("option --%s takes no value" % name)
        elif word[:2] != "--" or name in ("target", "help", "version", "reload") or name not in values:
            import difflib
            close = difflib.get_close_matches(word.partition("=")[0], ["--" + o for o in values if o != "target"], n=1)
            raise _UsageError("unknown option %s%s" % (word.partition("=")[0],
                                                       "; did you mean %s?" % close[0] if close else ""))
        elif not eq and (not words or words[0].startswith("--")):
            raise _UsageError("option --%s wants a value" % name)
        else:
            values[name] = value if eq else words.pop(0)
    if values["target"] is None and not (values["help"] or values["version"]):
        raise _UsageError("the following arguments are required: MODULE:ATTR")
    return values


def _cli_config(args: dict) -> dict:
    values = load_config(args["config"]) if args["config"] else make_config()
    for name in (*_CLI_ALIASES, *_ROWS):  # an alias is read as the key it stands for; the key wins
        if args[name] is not None:
            key = _CLI_ALIASES.get(name, name)
            values[key] = _convert(key, _cli_value(key, args[name]))
    if args["reload"]:
        values["engine.autoreload.on"] = True
    return values


def _check_certificates(config):
    """Load the TLS files once up front, so a bad path is one line, not a traceback."""
    if config["server.ssl_certificate"] or config["server.ssl_private_key"]:
        try:
            make_ssl_context(config)
        except OSError as exc:  # ssl.SSLError is an OSError too
            raise ConfigError("cannot load the TLS certificate or key: %s" % (exc.strerror or exc)) from None


def _run_cached() -> None:
    """Become this very process (pid, argv, signals, fds) run from a .pyc: a script is compiled at every
    start, and the compiler's garbage stays resident (half the idle RSS).  Returns if it cannot."""
    import importlib.util
    import py_compile
    path, cache = os.path.abspath(__file__), os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    sys.pycache_prefix = sys.pycache_prefix or os.path.join(cache, "minipub")  # laid out as -X pycache_prefix
    pyc = importlib.util.cache_from_source(path)
    try:
        os.makedirs(os.path.dirname(pyc), exist_ok=True)
        with open(path, "rb") as f, open(pyc, "a+b") as cached:  # "a+": a missing .pyc reads as b""
            cached.seek(0)  # a PEP 552 hash-checked .pyc: an edit within the same second is not missed
            if cached.read(16) != importlib.util.MAGIC_NUMBER + b"\3\0\0\0" + importlib.util.source_hash(f.read()):
                py_compile.compile(path, pyc, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        os.execve(sys.executable, [sys.executable] + _interpreter_args() + [pyc] + sys.argv[1:],
                  dict(os.environ, MINIPUB_SCRIPT=sys.argv[0]))
    except OSError:
        pass  # no cache to write, or no exec: go on from source


def main(argv=None) -> int:
    """The command line; returns the exit status."""
    try:
        args = _parse_args(argv)
    except _UsageError as exc:
        print("minipub: error: %s\nrun '%s --help' for the options" % (exc, _prog()), file=sys.stderr)
        return 2
    if args["help"] or args["version"]:
        print(_help() if args["help"] else "minipub %s" % __version__, end="" if args["help"] else "\n")
        return 0
    try:
        config = _cli_config(args)
        sections = _read_ini(args["config"])[1] if args["config"] else {}  # [/path] sections: the app's
        configure_logging(config)
        # Supervising (workers, reloading): only the children import the app.
        supervised = config["engine.autoreload.on"] or config["server.workers"] > 1
        app = None if supervised else load_target(args["target"], dict(config, **sections))
        _split_target(args["target"])  # supervising: a typo in the target is still one line here
        _check_certificates(config)
        sock = _listen_socket(config)
    except (ConfigError, _TargetError) as exc:
        print("minipub: error: %s" % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        where = config["server.socket_file"] or "%s port %s" % (config["server.socket_host"],
                                                              config["server.socket_port"])
        print("minipub: error: cannot listen on %s: %s" % (where, exc.strerror or exc), file=sys.stderr)
        return 2
    try:
        return serve(app, config, sock, ["target", args["target"], sections])
    except (ConfigError, _StartError) as exc:
        print("minipub: error: %s" % exc, file=sys.stderr)
        return 2



# -- CherryPy's import paths -----------------------------------------------------
# ``from minipub.lib import static``, ``minipub.lib.auth_basic.checkpassword_dict``,
# ``from minipub.test import helper``, ``minipub.dispatch.MethodDispatcher``: views
# of this one file's objects registered in sys.modules, not a second framework.

def _get_ha1_dict_plain(user_password_dict: dict):
    """CherryPy's lib.auth_digest.get_ha1_dict_plain: get_ha1(realm, user) = MD5(user:realm:password)."""
    def get_ha1(realm, user):
        password = user_password_dict.get(user)
        return None if password is None else _Digest.h("MD5", "%s:%s:%s" % (user, realm, password))
    return get_ha1


def _get_ha1_dict(user_ha1_dict: dict):
    """CherryPy's lib.auth_digest.get_ha1_dict: get_ha1(realm, user) from stored MD5 H(A1) values."""
    return lambda realm, user: user_ha1_dict.get(user)


def _helper_attribute(name: str):
    if name == "CPWebCase":  # built at first use: unittest is not imported by ``import minipub``
        case = _cpwebcase()
        for module in [m for m in sys.modules.values() if getattr(m, "_minipub_helper", False)]:
            module.CPWebCase = case
        return case
    raise AttributeError("module 'test.helper' has no attribute %r" % name)


def _cpwebcase():
    import unittest

    class CPWebCase(unittest.TestCase):
        """CherryPy's test helper, in-process: setup_server() mounts on minipub.tree, getPage()
        calls the tree through the same Application code the server runs (no socket)."""

        @classmethod
        def setUpClass(cls):
            super().setUpClass()
            cls._saved_apps = dict(tree.apps)
            setup = getattr(cls, "setup_server", None)
            if setup is not None:
                setup()

        @classmethod
        def tearDownClass(cls):
            tree.apps.clear()
            for name, app in cls._saved_apps.items():
                tree._put(name, app)
            super().tearDownClass()

        def getPage(self, url, headers=None, method="GET", body=None, protocol="HTTP/1.1"):
            body = body.encode("utf-8") if isinstance(body, str) else body or b""
            answer = TestClient(tree).send(method, url, headers or [], body)
            self.status = "%d %s" % (answer.status, answer.reason)
            self.headers, self.body = answer.fields, answer.body
            return self.status, self.headers, self.body

        def _values(self, key):
            return [v for k, v in self.headers if k.lower() == key.lower()]

        def assertStatus(self, status, msg=None):
            wanted = status if isinstance(status, (list, tuple)) else [status]
            code, line = int(self.status[:3]), self.status
            if not any(code == s if isinstance(s, int) else line == s or line[:3] == s for s in wanted):
                self.fail(msg or "status %r, wanted %r" % (self.status, status))

        def assertHeader(self, key, value=None, msg=None):
            values = self._values(key)
            if not values or (value is not None and str(value) not in values):
                self.fail(msg or "%s: %r, wanted %r" % (key, values, value))

        def assertNoHeader(self, key, msg=None):
            if self._values(key):
                self.fail(msg or "%s present: %r" % (key, self._values(key)))

        def _bytes(self, value):
            return value.encode("utf-8") if isinstance(value, str) else value

        def assertBody(self, value, msg=None):
            if self.body != self._bytes(value):
                self.fail(msg or "body %r, wanted %r" % (self.body[:200], value))

        def assertInBody(self, value, msg=None):
            if self._bytes(value) not in self.body:
                self.fail(msg or "%r not in body %r" % (value, self.body[:200]))

        def assertNotInBody(self, value, msg=None):
            if self._bytes(value) in self.body:
                self.fail(msg or "%r in body" % (value,))

        def assertMatchesBody(self, pattern, msg=None, flags=0):
            if re.search(self._bytes(pattern), self.body, flags) is None:
                self.fail(msg or "%r does not match the body" % (pattern,))
    return CPWebCase


def _import_paths(name: str) -> None:
    """Register the submodules under ``name`` (the module's name, and its file name as a script)."""
    from types import ModuleType
    this = sys.modules[__name__]

    def module(sub: str, doc: str, **names):
        made = sys.modules.get("%s.%s" % (name, sub))
        if made is None:
            made = sys.modules["%s.%s" % (name, sub)] = ModuleType("%s.%s" % (name, sub), doc)
        made.__dict__.update(names)
        return made
    static = module("lib.static", "serve_file, serve_download, staticdir, staticfile", serve_file=serve_file,
                    serve_download=serve_download, staticdir=_staticdir, staticfile=_staticfile)
    basic = module("lib.auth_basic", "tools.auth_basic", checkpassword_dict=_checkpassword_dict,
                   basic_auth=_basic)
    digest = module("lib.auth_digest", "tools.auth_digest", get_ha1_dict_plain=_get_ha1_dict_plain,
                    get_ha1_dict=_get_ha1_dict, digest_auth=_digest)
    this.lib = module("lib", "CherryPy's cherrypy.lib paths", static=static, auth_basic=basic, auth_digest=digest)
    helper = module("test.helper", "CPWebCase", __getattr__=_helper_attribute, _minipub_helper=True)
    this.test = module("test", "CherryPy's cherrypy.test paths", helper=helper)
    this.dispatch = module("dispatch", "request.dispatch values", Dispatcher=Dispatcher,
                           MethodDispatcher=MethodDispatcher)


_import_paths(__name__)

if __name__ == "__main__":
    # Run as a script this module is "__main__"; register it under its file
    # name too, so the application's ``import minipub`` gets this very module
    # (one ``request`` object), whatever name the vendored copy has.
    if __spec__ is None and __file__.endswith(".pyc") and "MINIPUB_SCRIPT" in os.environ:  # from _run_cached
        pyc_dir, sys.argv[0] = os.path.dirname(__file__), os.environ.pop("MINIPUB_SCRIPT")
        __file__ = os.path.join(os.getcwd(), sys.argv[0])  # what Python makes of the script's path
        sys.path[:1] = [os.path.dirname(os.path.realpath(__file__))] if sys.path[:1] == [pyc_dir] else sys.path[:1]
    elif __spec__ is None and __file__.endswith(".py") and os.name == "posix" and sys.executable and \
            "valgrind" not in os.environ.get("LD_PRELOAD", ""):  # an exec would leave the instruction counter behind
        _run_cached()  # returns only if it cannot
    sys.modules.setdefault(os.path.splitext(os.path.basename(__file__))[0], sys.modules[__name__])
    _import_paths(os.path.splitext(os.path.basename(__file__))[0])
    sys.exit(_reload_child() if _RELOAD_ENV in os.environ else main())
