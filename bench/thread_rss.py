"""What a worker held by a long-lived response costs: RSS of minipub with N workers each held.

    python3 bench/thread_rss.py [--counts 10,110]

For each N, a server with ``thread_pool = N`` runs an app whose generator sends one server-sent
event and then sleeps (an SSE stream, a log tail); N clients each read that first event, so every
worker is held.  The server's VmRSS and Threads come from /proc/PID/status.  The difference
between two counts, divided by the difference in workers, is the RSS one held worker costs.
Linux only, 127.0.0.1 only, stdlib only.
"""
import argparse
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

SERVER = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
import minipub

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/event-stream")])
    def events():
        yield b"data: hello\n\n"
        time.sleep(120)
    return events()
minipub.Server(app, "127.0.0.1", int(sys.argv[2]), thread_pool=int(sys.argv[3])).serve_forever()
'''


def status(pid):
    with open("/proc/%d/status" % pid) as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


def held(count):
    """(RSS kB, threads) of a server whose ``count`` workers are all held."""
    port = common.free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, common.REPO, str(port), str(count)])
    socks = []
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((common.HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for _ in range(count):
            sock = socket.create_connection((common.HOST, port), timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            data = b""
            while b"data: hello" not in data:
                data += sock.recv(4096)
            socks.append(sock)
        return status(proc.pid)
    finally:
        for sock in socks:
            sock.close()
        proc.kill()
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="10,110")
    counts = [int(n) for n in parser.parse_args().counts.split(",")]
    figures = [(n,) + held(n) for n in counts]
    for n, rss, threads in figures:
        print("thread_pool=%-4d all held: RSS %6.1f MB, %d threads" % (n, rss / 1024, threads))
    (n0, rss0, _), (n1, rss1, _) = figures[0], figures[-1]
    print("per held worker: %.1f kB" % ((rss1 - rss0) / (n1 - n0)))


if __name__ == "__main__":
    main()
