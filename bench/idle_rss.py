"""Idle memory after a few requests: `python minipub.py` (the script form) against
`python -m minipub` and waitress, on the same interpreter in one run (issue 15).

usage: python3 bench/idle_rss.py [--runs N] [--requests N] [--python PY]

Each server serves the hello app with 10 threads; after REQUESTS GETs (one
connection each) and a short settle, VmRSS is read from /proc/PID/status.
Servers are started in turn, N rounds, and the median of each is printed.
The -m form runs with bytecode writing allowed (a cached .pyc, as an
installed package has); the script form runs as the user types it.
"""
import argparse
import os
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import REPO, free_port, start_server, stop_server, wait_ready  # noqa: E402

FORMS = {
    # the design card's command, default settings (its access log goes to the server's log file)
    "minipub script": ["{py}", os.path.join(REPO, "minipub.py"), "bench.apps:Root", "--port", "{port}", "--threads", "10"],
    "minipub -m": ["{py}", "-m", "minipub", "bench.apps:Root", "--port", "{port}", "--threads", "10"],
    "waitress": ["{py}", "-m", "bench.apps", "waitress", "{port}", "10"],
}


def vm_rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS for %d" % pid)


def measure(name, py, requests):
    port = free_port()
    argv = [a.format(py=py, port="{port}") for a in FORMS[name]]
    env = common.bench_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # -m: a cached .pyc, as for an installed package
    server = start_server("idle-" + name.replace(" ", "-"), argv, port, env=env)
    try:
        ok, why = wait_ready(server, timeout=20)
        if not ok:
            raise RuntimeError("%s: %s\n%s" % (name, why, server.log_tail()))
        for _ in range(requests):
            with urllib.request.urlopen(server.url, timeout=5) as answer:
                answer.read()
        time.sleep(0.5)  # let workers go idle
        return vm_rss_mb(server.proc.pid)
    finally:
        stop_server(server)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--requests", type=int, default=21)
    p.add_argument("--python", default=None, help="interpreter (default: the bench venv's)")
    a = p.parse_args()
    py = a.python or common.ensure_venv(quiet=True)
    for name in FORMS:  # one untimed start each: writes the .pyc files
        measure(name, py, 1)
    rss = {name: [] for name in FORMS}
    for _ in range(a.runs):
        for name in FORMS:
            rss[name].append(measure(name, py, a.requests))
    med = {name: statistics.median(values) for name, values in rss.items()}
    print("idle RSS after %d requests (median of %d, %s):" % (a.requests, a.runs, py))
    for name, value in med.items():
        print("  %-15s %5.1f MB  (x%.2f waitress; runs: %s)" % (
            name, value, value / med["waitress"], ", ".join("%.1f" % v for v in rss[name])))
    return 0 if med["minipub script"] <= med["waitress"] else 1


if __name__ == "__main__":
    sys.exit(main())
