"""Hostile clients and load: minipub side by side with waitress and cheroot.

usage: python3 bench/hostile.py [--duration 60] [--only minipub,waitress,cheroot]

Scenarios, each bounded in time and count, all on 127.0.0.1:
  wrk      wrk -t2 -c50 for --duration s after a 5 s warm-up: errors, req/s, RSS growth
  slowloris 500 connections sending one header byte every 5 s; a fresh client every
           second meanwhile (worst latency), and when each slow connection is closed
  idle     1,000 keep-alive connections left idle after one request; fresh-client latency
  resets   2,000 connect-then-RST cycles, then one normal request, fds/threads and idle CPU
minipub runs with head_timeout=--head-timeout (10 s) and keepalive_timeout=60 s so the idle
connections stay open; waitress and cheroot run with their defaults and 10 threads each.
Peers run in bench/.venv (or /work/main/bench/.venv); stdlib only otherwise.
"""
import argparse
import json
import os
import re
import resource
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOST = "127.0.0.1"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
PROBE = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
HELLO = b"Hello, world!"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))])
    return [HELLO]


def serve(name, port, head_timeout):
    """Run in the server process: ``hostile.py --serve NAME PORT HEAD_TIMEOUT``."""
    if name == "minipub":
        sys.path.insert(0, REPO)
        import minipub
        minipub.Server(app, HOST, port, thread_pool=10, head_timeout=head_timeout,
                       keepalive_timeout=60.0).serve_forever()
    elif name == "waitress":
        import waitress
        waitress.serve(app, host=HOST, port=port, threads=10, _quiet=True)
    elif name == "cheroot":
        from cheroot import wsgi
        wsgi.Server((HOST, port), app, numthreads=10).safe_start()


def peer_python():
    for venv in (os.path.join(HERE, ".venv"), "/work/main/bench/.venv"):
        python = os.path.join(venv, "bin", "python")
        if os.path.exists(python):
            return python
    sys.exit("no venv with waitress and cheroot: run bench/setup.sh")


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it


# ---------------------------------------------------------------- the server

class Proc:
    def __init__(self, name, head_timeout):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        python = sys.executable if name == "minipub" else peer_python()
        self.p = subprocess.Popen([python, os.path.abspath(__file__), "--serve", name,
                                   str(self.port), str(head_timeout)],
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


def probe(port, timeout=10.0):
    """Seconds for a fresh client's whole request, or None if it failed/timed out."""
    start = time.monotonic()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(PROBE)
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return time.monotonic() - start if data.startswith(b"HTTP/1.1 200") and data.endswith(HELLO) else None


def worst(latencies):
    if not latencies:
        return "n/a"
    if None in latencies:
        return "%d/%d failed (>10 s)" % (latencies.count(None), len(latencies))
    return "%.3f s" % max(latencies)


# ---------------------------------------------------------------- scenarios

def run_wrk(proc, duration):
    subprocess.run(["wrk", "-t2", "-c50", "-d5s", "http://%s:%d/" % (HOST, proc.port)],
                   capture_output=True, timeout=60)
    before = proc.rss_mb()
    out = subprocess.run(["wrk", "-t2", "-c50", "-d%ds" % duration, "http://%s:%d/" % (HOST, proc.port)],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"req_per_s": rps, "errors": errors, "rss_after_warmup_mb": round(before, 1),
            "rss_growth_mb": round(proc.rss_mb() - before, 1)}


def nonblocking_connect(port):
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
            except BlockingIOError:
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
            except BlockingIOError:
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
        except BlockingIOError:
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
        if i % 2:
            sock.send(b"GET / HTTP/1.1\r\nHo")  # every other one resets mid-head
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds of wrk (default 60)")
    parser.add_argument("--head-timeout", type=float, default=10.0, help="minipub head deadline")
    parser.add_argument("--only", default="minipub,waitress,cheroot")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve[0], int(args.serve[1]), float(args.serve[2]))
    raise_nofile()
    results = {}
    for name in args.only.split(","):
        print("== %s" % name, file=sys.stderr, flush=True)
        proc, row = Proc(name, args.head_timeout), {}
        try:
            row["wrk"] = run_wrk(proc, args.duration)
            print("   wrk %s" % row["wrk"], file=sys.stderr, flush=True)
            row["slowloris"] = run_slowloris(proc, 500, 5.0, args.head_timeout + 15)
            print("   slowloris %s" % row["slowloris"], file=sys.stderr, flush=True)
            row["idle"] = run_idle(proc, 1000, 15.0)
            print("   idle %s" % row["idle"], file=sys.stderr, flush=True)
            row["resets"] = run_resets(proc, 2000)
            print("   resets %s" % row["resets"], file=sys.stderr, flush=True)
        finally:
            proc.stop()
        results[name] = row
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "hostile.json"), "w") as f:
        json.dump({"duration": args.duration, "head_timeout": args.head_timeout,
                   "results": results}, f, indent=2)
    for name, row in results.items():
        print(name)
        for scenario, figures in row.items():
            print("  %-9s %s" % (scenario, ", ".join("%s=%s" % kv for kv in figures.items())))


if __name__ == "__main__":
    main()
