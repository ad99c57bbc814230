"""Shared helpers for minipub's benchmark scripts (stdlib only).

Every scenario script in bench/ (run.py, and later uploads.py, static.py,
slowloris.py, ...) starts servers and load generators through these helpers
so that start-up, readiness, shutdown and statistics behave the same way.

All traffic goes to 127.0.0.1 only.
"""

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv")
VENV_PY = os.path.join(VENV, "bin", "python")
RESULTS = os.path.join(HERE, "results")
LOGS = os.path.join(RESULTS, "logs")
PYCACHE = os.path.join(RESULTS, "pycache")
HOST = "127.0.0.1"
HELLO = b"Hello, world!"


# --------------------------------------------------------------- environment

def ensure_venv(quiet=False):
    """Run bench/setup.sh (idempotent) unless the venv already has the peers."""
    marker = os.path.join(VENV, ".bench-peers-ok")
    if os.path.exists(VENV_PY) and os.path.exists(marker):
        return VENV_PY
    cmd = ["bash", os.path.join(HERE, "setup.sh")]
    out = subprocess.run(cmd, capture_output=quiet, text=True)
    if out.returncode != 0:
        raise RuntimeError("bench/setup.sh failed:\n%s" % (out.stderr or ""))
    with open(marker, "w") as f:
        f.write("ok\n")
    return VENV_PY


def venv_bin(name):
    return os.path.join(VENV, "bin", name)


def have_tool(name):
    return shutil.which(name) is not None


def bench_env(extra=None):
    """Environment for server processes: repo root on PYTHONPATH."""
    env = dict(os.environ)
    for key in ("PYTHONSTARTUP", "PYTHONHOME", "PYTHONINSPECT"):
        env.pop(key, None)
    env["PYTHONPATH"] = REPO
    env["PYTHONUNBUFFERED"] = "1"
    # keep .pyc files out of the repo root (minipub.py lives there)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    if extra:
        env.update(extra)
    return env


# ------------------------------------------------------------ server process

def free_port(host=HOST):
    """A currently unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A started server: the Popen object, its port and its log file."""

    def __init__(self, name, proc, port, log_path, argv):
        self.name = name
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.argv = argv

    @property
    def url(self):
        return "http://%s:%d/" % (HOST, self.port)

    def log_tail(self, lines=15):
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def start_server(name, argv, port, env=None, cwd=None, log_dir=LOGS):
    """Start argv (list; the string '{port}' is substituted) in its own
    process group, output going to results/logs/NAME.log."""
    os.makedirs(log_dir, exist_ok=True)
    argv = [a.format(port=port) if isinstance(a, str) else str(a) for a in argv]
    log_path = os.path.join(log_dir, "%s.log" % name)
    log = open(log_path, "w")
    log.write("$ %s\n" % " ".join(argv))
    log.flush()
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd or REPO, env=env if env is not None else bench_env(),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    finally:
        log.close()
    return ServerProcess(name, proc, port, log_path, argv)


def wait_ready(server, timeout=15.0, path="/", expect_body=None):
    """Poll until the port accepts and a GET returns 200, or fail.

    Returns (ok, message). Fails early if the process exits.
    """
    deadline = time.monotonic() + timeout
    delay = 0.02
    last = "no connection"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False, "exited with code %s before becoming ready" % server.proc.returncode
        try:
            with socket.create_connection((HOST, server.port), timeout=0.5):
                pass
        except OSError as e:
            last = "connect: %s" % e
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
            continue
        try:
            req = urllib.request.Request("http://%s:%d%s" % (HOST, server.port, path))
            with urllib.request.urlopen(req, timeout=3) as resp:
                body = resp.read()
                if resp.status != 200:
                    last = "HTTP %s" % resp.status
                elif expect_body is not None and body != expect_body:
                    return False, "unexpected body %r" % body[:80]
                else:
                    return True, "ready"
        except Exception as e:  # HTTPError, reset while still booting, ...
            last = "GET: %s" % e
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    return False, "not ready after %.0fs (%s)" % (timeout, last)


def stop_server(server, timeout=5.0):
    """SIGTERM the server's process group, SIGKILL it after timeout."""
    proc = server.proc
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # the group may still hold workers even when the leader is gone
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    return proc.returncode


# ------------------------------------------------------------ load generators

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value, unit):
    return float(value) * _UNITS[unit]


def run_cmd(argv, timeout):
    """Run argv, return (returncode, stdout, stderr); -9 on timeout."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -9, out, "timed out after %ss" % timeout


def _grab(res, text, fields, flags=0):
    """Set res[key] = conv(first group) for each (key, pattern, conv) that matches ``text``."""
    for key, pattern, conv in fields:
        m = re.search(pattern, text, flags)
        if m:
            res[key] = conv(*m.groups())
    return res


def _empty():
    return {"rps": None, "p50_ms": None, "p99_ms": None, "requests": None, "non2xx": 0, "socket_errors": 0}


_WRK_LATENCY = r"^\s+%s%%\s+([\d.]+)(us|ms|s|m|h)\s*$"
_WRK = [("rps", r"Requests/sec:\s+([\d.]+)", float),
        ("p50_ms", _WRK_LATENCY % "50", _to_ms),
        ("p99_ms", _WRK_LATENCY % "99", _to_ms),
        ("requests", r"(\d+) requests in", int),
        ("non2xx", r"Non-2xx or 3xx responses:\s+(\d+)", int)]
_AB = [("rps", r"Requests per second:\s+([\d.]+)", float),
       ("requests", r"Complete requests:\s+(\d+)", int),
       ("socket_errors", r"Failed requests:\s+(\d+)", int),
       ("non2xx", r"Non-2xx responses:\s+(\d+)", int),
       ("p50_ms", r"^\s+50%\s+(\d+)", float),
       ("p99_ms", r"^\s+99%\s+(\d+)", float)]


def parse_wrk(text):
    """Parse `wrk --latency` output into a dict (latencies in ms)."""
    res = _grab(_empty(), text, _WRK, re.M)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        detail = dict(zip(("connect", "read", "write", "timeout"), (int(x) for x in m.groups())))
        res["socket_errors"], res["socket_detail"] = sum(detail.values()), detail
    return res


def parse_ab(text):
    """Parse ApacheBench output into a dict (latencies in ms)."""
    return _grab(_empty(), text, _AB, re.M)


def run_wrk(url, connections=10, threads=2, duration=5, timeout_s=2, extra=()):
    argv = ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration,
            "--timeout", "%ds" % timeout_s, "--latency"] + list(extra) + [url]
    rc, out, err = run_cmd(argv, timeout=duration + 30)
    res = parse_wrk(out)
    res["argv"] = " ".join(argv)
    if rc != 0 or res["rps"] is None:
        res["error"] = ("wrk exit %s: %s" % (rc, (err or out).strip()[-300:]))
    return res


def run_ab(url, requests=5000, concurrency=10, keepalive=False, timeout=120):
    argv = ["ab", "-q", "-n", str(requests), "-c", str(concurrency), "-s", "10", "-r"]
    if keepalive:
        argv.append("-k")
    argv.append(url)
    rc, out, err = run_cmd(argv, timeout=timeout)
    res = parse_ab(out)
    res["argv"] = " ".join(argv)
    if rc != 0 or res["rps"] is None:
        res["error"] = ("ab exit %s: %s" % (rc, (err or out).strip()[-300:]))
    return res


def warm_up(url, seconds=1, connections=4):
    """Brief keep-alive load so lazy imports / pools are hot."""
    if have_tool("wrk"):
        run_cmd(["wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds, url],
                timeout=seconds + 20)
    else:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                urllib.request.urlopen(url, timeout=2).read()
            except Exception:
                break


# ----------------------------------------------------------------- statistics

def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def fmt(v, spec="{:,.0f}", none="-"):
    return none if v is None else spec.format(v)


def python_version(py):
    rc, out, err = run_cmd([py, "-c", "import sys; print(sys.version.split()[0])"], 30)
    return out.strip() if rc == 0 else None


def package_versions(py, names):
    code = ("import importlib.metadata as m, sys\n"
            "for n in sys.argv[1:]:\n"
            "    try: print(n, m.version(n))\n"
            "    except Exception: print(n, '-')\n")
    rc, out, _ = run_cmd([py, "-c", code] + list(names), 30)
    vers = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            vers[parts[0]] = parts[1]
    return vers


def log(*args):
    print(*args, file=sys.stderr, flush=True)
