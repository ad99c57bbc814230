"""Hostile clients and load: minipub side by side with waitress and cheroot.

usage: python3 bench/hostile.py [--duration 60] [--only minipub,waitress,cheroot] [--scenarios a,b] [--tls]

Scenarios, each bounded in time and count, all on 127.0.0.1:
  wrk      wrk -t2 -c50 for --duration s after a 5 s warm-up: errors, req/s, RSS growth
  slowloris 500 connections sending one header byte every 5 s; a fresh client every
           second meanwhile (worst latency), and when each slow connection is closed
  idle     1,000 keep-alive connections left idle after one request; fresh-client latency
  resets   2,000 connect-then-RST cycles (every other one after half a request head, or with
           --tls half a ClientHello), then one normal request, fds/threads and idle CPU
  midstream 100 clients reset in the middle of a 4 MB response, 100 in the middle of a 1 MB upload
  pipeline 20 connections each sending 500 pipelined requests at once: all answered, in order
  silent   500 connections that send nothing at all (with --tls: a handshake that never starts);
           fresh-client latency meanwhile
  slowbody 50 clients POSTing Content-Length: 1000000 at one byte a second: fresh-request latency
           p50/p99 (40 probes over 10 s), the server's RSS and threads meanwhile
  bigbody  50 clients each sending 1 MiB of a 100 MB body at once (Content-Length, chunked,
           Expect: 100-continue by turns), then one byte a second: the same figures
  slowread 20 clients GETting a 12.8 MB streamed answer that never read (64 KiB receive buffer):
           the same figures
  plain    (--tls) 200 plain-HTTP requests to the TLS port: answered (400) or closed, no harm
  versions (--tls) a handshake with each of TLS 1.0, 1.1, 1.2 and 1.3: which are accepted
At the end the server must still answer ("alive").  --tls serves HTTPS with a self-signed
certificate made by the openssl command in a temporary directory (waitress has no TLS: skipped).
minipub runs with head_timeout=--head-timeout (10 s) and keepalive_timeout=60 s so the idle
connections stay open; waitress and cheroot run with their defaults and 10 threads each.
Peers run in bench/.venv (or /work/main/bench/.venv, or this Python if it has them); stdlib only otherwise.
"""
import argparse
import json
import os
import re
import resource
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOST = "127.0.0.1"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
PROBE = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
HELLO = b"Hello, world!"
BIG = b"x" * (64 * 1024)  # /big answers 64 of these: 4 MB
TLS = None  # with --tls: the client's SSLContext (no verification: the certificate is self-signed)


def app(environ, start_response):
    if environ["PATH_INFO"] == "/huge":  # 12.8 MB of unknown length: chunked, or close-delimited
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return (BIG for _ in range(200))
    if environ["PATH_INFO"] == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(64 * len(BIG)))])
        return (BIG for _ in range(64))
    if environ["REQUEST_METHOD"] == "POST":
        environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))])
    return [HELLO]


def serve(name, port, head_timeout, cert=None, key=None):
    """Run in the server process: ``hostile.py --serve NAME PORT HEAD_TIMEOUT [CERT KEY]``."""
    if name == "minipub":
        sys.path.insert(0, REPO)
        import minipub
        tls = {"ssl_certificate": cert, "ssl_private_key": key} if cert else {}
        minipub.Server(app, HOST, port, thread_pool=10, head_timeout=head_timeout,
                       keepalive_timeout=60.0, **tls).serve_forever()
    elif name == "waitress":
        import waitress
        waitress.serve(app, host=HOST, port=port, threads=10, _quiet=True)
    elif name == "cheroot":
        from cheroot import wsgi
        server = wsgi.Server((HOST, port), app, numthreads=10)
        if cert:
            from cheroot.ssl.builtin import BuiltinSSLAdapter
            server.ssl_adapter = BuiltinSSLAdapter(cert, key)
        server.safe_start()


def peer_python():
    for venv in (os.path.join(HERE, ".venv"), "/work/main/bench/.venv"):
        python = os.path.join(venv, "bin", "python")
        if os.path.exists(python):
            return python
    try:
        import cheroot  # noqa: F401  (installed for this Python: use it)
        import waitress  # noqa: F401
        return sys.executable
    except ImportError:
        sys.exit("no venv with waitress and cheroot: run bench/setup.sh")


def make_certificate(directory):
    """A self-signed P-256 certificate for 127.0.0.1, made with the openssl command."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def client_context(version=None):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if version is not None:  # SECLEVEL=0 lets this client offer TLS 1.0/1.1: refusing them is the server's job
        import warnings
        context.set_ciphers("DEFAULT@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # offering TLS 1.0/1.1 is the point
            context.minimum_version = context.maximum_version = version
    return context


def connect(port, timeout=10.0, handshake=True):
    """A connected client socket, TLS (handshake done) with --tls."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    if TLS is None or not handshake:
        return sock
    try:
        return TLS.wrap_socket(sock)
    except OSError:
        sock.close()
        raise


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it


# ---------------------------------------------------------------- the server

class Proc:
    def __init__(self, name, head_timeout, tls_files=()):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        python = sys.executable if name == "minipub" else peer_python()
        self.p = subprocess.Popen([python, os.path.abspath(__file__), "--serve", name,
                                   str(self.port), str(head_timeout), *tls_files],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("%s did not start" % name)

    def stat(self, field):
        with open("/proc/%d/status" % self.p.pid) as f:
            return int(re.search(r"%s:\s+(\d+)" % field, f.read()).group(1))

    def rss_mb(self):
        return self.stat("VmRSS") / 1024.0

    def cpu_seconds(self):
        with open("/proc/%d/stat" % self.p.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fds(self):
        return len(os.listdir("/proc/%d/fd" % self.p.pid))

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)


def send_and_read(port, payload, timeout):
    """Send ``payload`` on a new connection and read until the server closes; None if it failed."""
    try:
        with connect(port, timeout) as sock:
            return read_to_close(sock, payload)
    except OSError:
        return None


def read_to_close(sock, payload):
    """Send ``payload`` on ``sock``, then everything received until the peer closes (OSError passes)."""
    sock.sendall(payload)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def probe(port, timeout=10.0):
    """Seconds for a fresh client's whole request, or None if it failed/timed out."""
    start = time.monotonic()
    data = send_and_read(port, PROBE, timeout)
    return time.monotonic() - start if data and data.startswith(b"HTTP/1.1 200") and data.endswith(HELLO) else None


def worst(latencies):
    if not latencies:
        return "n/a"
    if None in latencies:
        return "%d/%d failed (>10 s)" % (latencies.count(None), len(latencies))
    return "%.3f s" % max(latencies)


# ---------------------------------------------------------------- scenarios

def run_wrk(proc, duration):
    url = "%s://%s:%d/" % ("https" if TLS else "http", HOST, proc.port)
    subprocess.run(["wrk", "-t2", "-c50", "-d5s", url], capture_output=True, timeout=60)
    before = proc.rss_mb()
    out = subprocess.run(["wrk", "-t2", "-c50", "-d%ds" % duration, url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"req_per_s": rps, "errors": errors, "rss_after_warmup_mb": round(before, 1),
            "rss_growth_mb": round(proc.rss_mb() - before, 1)}


WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def nonblocking_connect(port):
    if TLS is not None:  # the handshake first (blocking), then the same non-blocking flow
        sock = connect(port)
        sock.setblocking(False)
        return sock
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex((HOST, port))
    return sock


def run_slowloris(proc, count, interval, cap):
    """``count`` clients each send a head one byte every ``interval`` s; until all close or ``cap``."""
    sel, start = selectors.DefaultSelector(), time.monotonic()
    state = {}  # sock -> [bytes received, closed at, head sent?]
    for _ in range(count):
        sock = nonblocking_connect(proc.port)
        state[sock] = [b"", None, False]
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    latencies, stop = [], threading.Event()

    def prober():
        while not stop.wait(1.0):
            latencies.append(probe(proc.port))
    thread = threading.Thread(target=prober)
    thread.start()
    next_byte = time.monotonic() + interval
    while time.monotonic() - start < cap and any(s[1] is None for s in state.values()):
        for key, events in sel.select(max(0.0, min(1.0, next_byte - time.monotonic()))):
            sock, st = key.fileobj, state[key.fileobj]
            if events & selectors.EVENT_WRITE and not st[2]:
                try:
                    sock.send(b"GET / HTTP/1.1\r\nHost: bench\r\nX-Slow: ")
                    st[2] = True
                    sel.modify(sock, selectors.EVENT_READ)
                except OSError:
                    pass
                continue
            try:
                data = sock.recv(65536)
            except WOULD_BLOCK:
                continue
            except OSError:
                data = b""
            st[0] += data
            if not data:
                st[1] = time.monotonic() - start
                sel.unregister(sock)
        if time.monotonic() >= next_byte:
            next_byte += interval
            for sock, st in state.items():
                if st[1] is None and st[2]:
                    try:
                        sock.send(b"a")
                    except OSError:
                        pass
    stop.set()
    thread.join()
    closed = [s[1] for s in state.values() if s[1] is not None]
    for sock in state:
        sock.close()
    sel.close()
    return {"fresh_client_worst": worst(latencies), "probes": len(latencies),
            "closed_by_server": "%d/%d" % (len(closed), count),
            "answered_408": sum(s[0].startswith(b"HTTP/1.1 408") for s in state.values()),
            "close_time_s": "%.1f-%.1f" % (min(closed), max(closed)) if closed else "-"}


def run_idle(proc, count, settle):
    """``count`` keep-alive connections make one request each and stay idle."""
    sel, socks, answered = selectors.DefaultSelector(), [], 0
    for _ in range(count):
        sock = nonblocking_connect(proc.port)
        socks.append(sock)
        sel.register(sock, selectors.EVENT_WRITE)
    deadline, pending = time.monotonic() + settle, count
    while pending and time.monotonic() < deadline:
        for key, events in sel.select(0.5):
            sock = key.fileobj
            if events & selectors.EVENT_WRITE:
                try:
                    sock.send(REQUEST)
                    sel.modify(sock, selectors.EVENT_READ)
                except OSError:
                    sel.unregister(sock)
                    pending -= 1
                continue
            try:
                data = sock.recv(65536)
            except WOULD_BLOCK:
                continue
            except OSError:
                data = b""
            if data.endswith(HELLO):
                answered += 1
            sel.unregister(sock)
            pending -= 1
    latencies = [probe(proc.port) for _ in range(5)]
    still_open = 0
    for sock in socks:  # nothing to read and no EOF: the server still holds it open
        try:
            sock.recv(1)
        except WOULD_BLOCK:
            still_open += 1
        except OSError:
            pass
    for sock in socks:
        sock.close()
    sel.close()
    return {"answered": "%d/%d" % (answered, count), "fresh_client_worst": worst(latencies),
            "still_open_at_probe": still_open}


def run_resets(proc, cycles):
    fds, deadline = proc.fds(), time.monotonic() + 10
    while time.monotonic() < deadline:  # the previous scenario's sockets are still closing
        time.sleep(0.5)
        fds, last = proc.fds(), fds
        if fds == last:
            break
    threads = proc.stat("Threads")
    linger = struct.pack("ii", 1, 0)
    failed, done, cap = 0, 0, time.monotonic() + 60  # a full backlog makes connect() wait
    for i in range(cycles):
        if time.monotonic() > cap:
            break
        done += 1
        try:
            sock = socket.create_connection((HOST, proc.port), timeout=2)
        except OSError:
            failed += 1
            continue
        if i % 2:  # every other one resets mid-head, or mid-ClientHello
            sock.send(HALF_HELLO if TLS else b"GET / HTTP/1.1\r\nHo")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.close()
    served = probe(proc.port)
    time.sleep(1.0)  # let the server notice the last resets before measuring idle CPU
    cpu = proc.cpu_seconds()
    time.sleep(5.0)
    return {"cycles": done, "connect_failures": failed, "then_served": served is not None,
            "idle_cpu_percent": round((proc.cpu_seconds() - cpu) / 5.0 * 100, 2),
            "fds_before_after": "%d/%d" % (fds, proc.fds()),
            "threads_before_after": "%d/%d" % (threads, proc.stat("Threads"))}


def half_client_hello():
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context().wrap_bio(incoming, outgoing)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    return hello[:len(hello) // 2]


HALF_HELLO = half_client_hello()


def run_midstream(proc, count):
    """Clients that reset in the middle of a 4 MB response, or of a 1 MB upload."""
    linger, failed = struct.pack("ii", 1, 0), 0
    for i in range(2 * count):
        try:
            sock = connect(proc.port)
            if i % 2:
                sock.sendall(b"POST /up HTTP/1.1\r\nHost: bench\r\nContent-Length: 1048576\r\n\r\n" + BIG)
            else:
                sock.sendall(b"GET /big HTTP/1.1\r\nHost: bench\r\n\r\n")
                sock.recv(65536)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.close()
        except OSError:
            failed += 1
    return {"resets": 2 * count, "client_errors": failed, "then_served": probe(proc.port) is not None}


BIG_STARTS = [b"Content-Length: 100000000\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n5f5e100\r\n",
              b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n"]


def _slow_request(kind, i):
    if kind == "read":
        return b"GET /huge HTTP/1.1\r\nHost: bench\r\n\r\n"
    if kind == "body":
        return b"POST / HTTP/1.1\r\nHost: bench\r\nContent-Length: 1000000\r\n\r\nx"
    return b"POST / HTTP/1.1\r\nHost: bench\r\n" + BIG_STARTS[i % 3] + b"x" * (1 << 20)


def run_slow(proc, kind, count, probes=40, spacing=0.25):
    """``count`` slow clients (kind "body": uploads at 1 byte/s; "bigbody": 1 MiB of a 100 MB body
    at once, then 1 byte/s; "read": downloads never read) while a fresh client probes every
    ``spacing`` s: latency p50/p99, server RSS and threads meanwhile."""
    socks = []
    for i in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(10)
        try:
            sock.connect((HOST, proc.port))
            sock.settimeout(0.2 if kind == "bigbody" else 10)  # a server that does not read: go on
            sock.sendall(_slow_request(kind, i))
        except OSError:
            pass
        sock.settimeout(10)
        socks.append(sock)
    latencies, rss, threads, last_byte = [], 0.0, 0, time.monotonic()
    deadline = time.monotonic() + probes * spacing + 5.0  # a server that stalls gets fewer probes
    while len(latencies) < probes and time.monotonic() < deadline:
        if kind != "read" and time.monotonic() - last_byte >= 1.0:
            for sock in socks:
                try:
                    sock.send(b"x")
                except OSError:
                    pass
            last_byte = time.monotonic()
        latencies.append(probe(proc.port, timeout=5.0))
        rss, threads = max(rss, proc.rss_mb()), max(threads, proc.stat("Threads"))
        time.sleep(spacing)
    for sock in socks:
        sock.close()
    done = sorted(x for x in latencies if x is not None)
    pct = lambda q: "%.3f s" % done[min(len(done) - 1, int(q * len(done)))] if done else "n/a"  # noqa: E731
    return {"fresh_p50": pct(0.5), "fresh_p99": pct(0.99),
            "failed": "%d/%d" % (len(latencies) - len(done), len(latencies)),
            "rss_mb": round(rss, 1), "threads": threads}


def run_pipeline(proc, conns, depth):
    """``conns`` connections each send ``depth`` requests in one write, then read every answer."""
    answered = []

    def one():
        data = send_and_read(proc.port, REQUEST * (depth - 1) + PROBE, 30) or b""
        answered.append(data.count(b"HTTP/1.1 200 "))
    start = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(conns)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return {"answered": "%d/%d" % (sum(answered), conns * depth), "seconds": round(time.monotonic() - start, 2)}


def run_silent(proc, count):
    """``count`` connections that send nothing (over TLS: a handshake that never starts)."""
    socks = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection((HOST, proc.port), timeout=10))
        except OSError:
            pass
    latencies = [probe(proc.port) for _ in range(5)]
    still_open = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            sock.recv(1)
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
        sock.close()
    return {"connected": "%d/%d" % (len(socks), count), "fresh_client_worst": worst(latencies),
            "still_open_at_probe": still_open}


def run_plain_on_tls(proc, count):
    """Plain HTTP sent to the TLS port: a clear 400 (or a close), never harm to the server."""
    seen = {"answered_400": 0, "closed_silently": 0, "reset": 0, "other": 0}
    for _ in range(count):
        try:
            with socket.create_connection((HOST, proc.port), timeout=5) as sock:  # plain, on purpose
                data = read_to_close(sock, PROBE)
        except ConnectionResetError:
            seen["reset"] += 1
            continue
        except OSError:
            seen["other"] += 1
            continue
        kind = "answered_400" if data.startswith(b"HTTP/1.") and data[9:12] == b"400" else (
            "closed_silently" if not data else "other")
        seen[kind] += 1
    seen["then_served"] = probe(proc.port) is not None
    return seen


def run_versions(proc):
    """A handshake offering exactly one TLS version each: which ones the server accepts."""
    out = {}
    for name in ("TLSv1", "TLSv1_1", "TLSv1_2", "TLSv1_3"):
        try:
            context = client_context(getattr(ssl.TLSVersion, name))
            with socket.create_connection((HOST, proc.port), timeout=5) as raw:
                with context.wrap_socket(raw) as sock:
                    out[name] = "accepted (%s)" % sock.version()
        except ssl.SSLError as exc:
            out[name] = "refused (%s)" % (exc.reason or exc)
        except (OSError, ValueError) as exc:
            out[name] = "error (%s)" % exc
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds of wrk (default 60)")
    parser.add_argument("--head-timeout", type=float, default=10.0, help="minipub head deadline")
    parser.add_argument("--only", default="minipub,waitress,cheroot")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS (self-signed) and add TLS scenarios")
    parser.add_argument("--scenarios", help="comma-separated scenario names (default: all)")
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        name, port, head_timeout, *tls_files = args.serve
        return serve(name, int(port), float(head_timeout), *tls_files)
    raise_nofile()
    global TLS
    tls_files, names = (), args.only.split(",")
    if args.tls:
        if shutil.which("openssl") is None:
            sys.exit("--tls needs the openssl command")
        TLS, tls_files = client_context(), make_certificate(tempfile.mkdtemp(prefix="hostile-tls-"))
        names = [n for n in names if n != "waitress"]  # waitress has no TLS
    scenarios = [
        ("wrk", lambda proc: run_wrk(proc, args.duration)),
        ("slowloris", lambda proc: run_slowloris(proc, 500, 5.0, args.head_timeout + 15)),
        ("idle", lambda proc: run_idle(proc, 1000, 15.0)),
        ("resets", lambda proc: run_resets(proc, 2000)),
        ("midstream", lambda proc: run_midstream(proc, 100)),
        ("pipeline", lambda proc: run_pipeline(proc, 20, 500)),
        ("silent", lambda proc: run_silent(proc, 500)),
        ("slowbody", lambda proc: run_slow(proc, "body", 50)),
        ("bigbody", lambda proc: run_slow(proc, "bigbody", 50)),
        ("slowread", lambda proc: run_slow(proc, "read", 20)),
    ] + ([("plain", lambda proc: run_plain_on_tls(proc, 200)), ("versions", run_versions)] if args.tls else [])
    if args.scenarios:
        scenarios = [(n, run) for n, run in scenarios if n in args.scenarios.split(",")]
    results = {}
    for name in names:
        print("== %s%s" % (name, " (TLS)" if args.tls else ""), file=sys.stderr, flush=True)
        proc, row = Proc(name, args.head_timeout, tls_files), {}
        try:
            for scenario, run in scenarios:
                row[scenario] = run(proc)
                print("   %s %s" % (scenario, row[scenario]), file=sys.stderr, flush=True)
            row["end"] = {"alive": proc.p.poll() is None and probe(proc.port) is not None}
        finally:
            proc.stop()
        results[name] = row
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "hostile.json"), "w") as f:
        json.dump({"duration": args.duration, "head_timeout": args.head_timeout, "tls": args.tls,
                   "results": results}, f, indent=2)
    for name, row in results.items():
        print(name)
        for scenario, figures in row.items():
            print("  %-9s %s" % (scenario, ", ".join("%s=%s" % kv for kv in figures.items())))


if __name__ == "__main__":
    main()
