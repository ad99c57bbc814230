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
    text = minipub._user_line(info.value)
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


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        port = _free_port()
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


# ===========================================================================
# Command line and examples
# ===========================================================================


# ===========================================================================
# Hostile clients and load
# ===========================================================================
