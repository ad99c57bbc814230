"""The reloader and the idle footprint (stdlib only; loopback only; ~1 minute).

    python3 bench/reload.py [--edits 7] [--idle 20]

1. save -> new code served: edit the app under ``--reload`` (default 1 s
   frequency) at varied moments; the time until GET / returns the new body.
   Target: median < 1.5 s.
2. a steady client (a request on a new connection every 10 ms for 10 s)
   across 5 reloads: every request must get a 200 (zero refused/failed).
3. idle: voluntary context switches of all threads over ``--idle`` seconds
   (after a few requests) and RSS, for minipub without --reload,
   ``python -m http.server``, and waitress/cheroot when
   /work/main/bench/.venv exists; then minipub --reload watching 300 files:
   wake-ups per period and CPU % of parent + child.  ``python minipub.py``
   compiles the 2,500-line file from source at every start (Python never
   caches a script's bytecode), which leaves ~6 MB more RSS than
   ``python -m minipub`` (cached bytecode); both are shown.
"""
import argparse
import glob
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MINIPUB = os.path.join(REPO, "minipub.py")
PEER_PY = "/work/main/bench/.venv/bin/python"
# Every idle row runs on one interpreter, the peers' when present: this
# machine's python3 imports ~5 MB of site .pth extras before any user code.
PY = PEER_PY if os.path.exists(PEER_PY) else sys.executable
TICK = os.sysconf("SC_CLK_TCK")

APP = '''import minipub
{imports}
class Root:
    @minipub.expose
    def index(self):
        return {body!r}
'''


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    except OSError as exc:
        return None, repr(exc)
    finally:
        conn.close()


def wait_body(port, predicate, timeout=30.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = get(port, timeout=2.0)
        if status == 200 and predicate(body):
            return time.monotonic()
        time.sleep(interval)
    raise SystemExit("bench: server on port %d never served the expected body" % port)


def write_app(path, body, imports=""):
    with open(path, "w") as f:
        f.write(APP.format(body=body, imports=imports))


def server_env(cwd):
    # Bytecode caches go to a temporary directory, never into the repository.
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + cwd,
               PYTHONPYCACHEPREFIX=os.path.join(os.path.dirname(cwd), "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def start(argv, cwd, port, env=None):
    env = env or server_env(cwd)
    proc = subprocess.Popen([a.format(port=port) for a in argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    proc.port = port
    return proc


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def reloading(workdir, extra_imports="", python=sys.executable):
    write_app(os.path.join(workdir, "app.py"), "gen0", extra_imports)
    port = free_port()
    proc = start([python, MINIPUB, "app:Root", "--reload", "--port", "{port}",
                  "--log.screen", "false"], workdir, port)
    wait_body(port, lambda body: body == "gen0")
    return proc


# -- 1 and 2: reload latency and the steady client ----------------------------

def save_to_served(workdir, edits):
    proc = reloading(workdir)
    times = []
    try:
        for i in range(1, edits + 1):
            time.sleep(0.3 + (i * 0.37) % 1.0)  # spread saves over the poll period
            body = "gen%d" % i + "." * i  # a new size each time, as real edits have
            t0 = time.monotonic()
            write_app(os.path.join(workdir, "app.py"), body)
            times.append(wait_body(proc.port, lambda b: b == body) - t0)
    finally:
        stop(proc)
    return times


def steady_client(workdir, seconds=10.0, reloads=5):
    proc = reloading(workdir)
    results, edits = [], 0
    try:
        start_t = time.monotonic()
        next_edit = start_t + 1.0
        while time.monotonic() - start_t < seconds:
            now = time.monotonic()
            if edits < reloads and now >= next_edit:
                edits += 1
                write_app(os.path.join(workdir, "app.py"), "gen%d" % edits + "." * edits)
                next_edit = now + (seconds - 2.0) / reloads
            results.append(get(proc.port))
            time.sleep(0.01)
    finally:
        stop(proc)
    failed = [r for r in results if r[0] != 200]
    generations = sorted({r[1].rstrip(".") for r in results if r[0] == 200})
    return len(results), failed, generations


# -- 3: idle footprint ------------------------------------------------------------

def descendants(pid):
    kids = {pid}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids |= descendants(int(stat.split("/")[2]))
    return kids


def sample(pids):
    """(voluntary switches of all threads, CPU seconds, RSS kB) summed over pids."""
    switches = cpu = rss = 0
    for pid in pids:
        try:
            for status in glob.glob("/proc/%d/task/*/status" % pid):
                with open(status) as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            switches += int(line.split()[1])
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / TICK
            with open("/proc/%d/status" % pid) as f:
                rss += int([l for l in f if l.startswith("VmRSS")][0].split()[1])
        except (OSError, IndexError):
            pass
    return switches, cpu, rss


def ready_and_used(servers):
    for name, proc in servers.items():
        if name == "bare interpreter":
            continue
        deadline = time.monotonic() + 20
        while get(proc.port, 1.0)[0] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(5):
            get(proc.port)


def idle_servers(workdir):
    """Peers use their installed bytecode (the environment as it is); minipub a warm cache."""
    peer_env = dict(os.environ, PYTHONPATH=REPO)
    servers = {"minipub (python minipub.py)": start(
                   [PY, MINIPUB, "app:Root", "--port", "{port}", "--log.screen", "false"],
                   workdir, free_port()),
               "minipub (python -m minipub)": start(
                   [PY, "-m", "minipub", "app:Root", "--port", "{port}",
                    "--log.screen", "false"], workdir, free_port()),
               "bare interpreter": start([PY, "-c", "import time; time.sleep(600)"], workdir,
                                         free_port(), peer_env),
               "http.server": start([PY, "-m", "http.server", "{port}", "--bind",
                                     "127.0.0.1"], workdir, free_port(), peer_env)}
    if os.path.exists(PEER_PY):
        servers["waitress"] = start([PEER_PY, "-m", "waitress", "--host=127.0.0.1",
                                     "--port={port}", "bench.apps:hello_wsgi"], REPO, free_port(),
                                    peer_env)
        servers["cheroot"] = start([PEER_PY, "-m", "bench.apps", "cheroot", "{port}", "10"],
                                   REPO, free_port(), peer_env)
    return servers


def idle_footprint(workdir, seconds):
    write_app(os.path.join(workdir, "app.py"), "Hello, world!")
    warm = idle_servers(workdir)  # a first run fills the bytecode cache
    try:
        ready_and_used(warm)
    finally:
        for proc in warm.values():
            stop(proc)
    servers = idle_servers(workdir)
    watched = os.path.join(workdir, "watched")
    os.makedirs(watched)
    for i in range(299):  # + app.py = 300 watched files (and minipub.py)
        with open(os.path.join(watched, "mod_%03d.py" % i), "w") as f:
            f.write("VALUE = %d\n" % i)
    imports = "import sys; sys.path.insert(0, %r)\n" % watched + "".join(
        "import mod_%03d\n" % i for i in range(299))
    reloader_dir = os.path.join(workdir, "r")
    os.makedirs(reloader_dir)
    servers["minipub --reload, 300 files"] = reloading(reloader_dir, imports, PY)
    try:
        ready_and_used(servers)
        time.sleep(1.0)  # let keep-alive and thread hand-offs settle
        pids = {name: descendants(proc.pid) for name, proc in servers.items()}
        before = {name: sample(p) for name, p in pids.items()}
        time.sleep(seconds)
        after = {name: sample(p) for name, p in pids.items()}
    finally:
        for proc in servers.values():
            stop(proc)
    rows = []
    for name in servers:
        (s0, c0, _), (s1, c1, rss) = before[name], after[name]
        rows.append((name, len(pids[name]), s1 - s0, 100.0 * (c1 - c0) / seconds, rss / 1024.0))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=7)
    parser.add_argument("--idle", type=float, default=20.0)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="minipub-reload-")
    try:
        for sub in ("a", "b", "c"):
            os.makedirs(os.path.join(workdir, sub))
        times = save_to_served(os.path.join(workdir, "a"), args.edits)
        print("save -> new code served (frequency 1 s, %d edits): median %.3f s, max %.3f s "
              "(target median < 1.5 s)" % (len(times), statistics.median(times), max(times)))
        print("  each: %s" % " ".join("%.2f" % t for t in times))
        count, failed, gens = steady_client(os.path.join(workdir, "b"))
        print("steady client, a request every 10 ms for 10 s across 5 reloads: %d requests, "
              "%d failed or refused; generations served: %s" % (count, len(failed), ", ".join(gens)))
        for status, detail in failed[:5]:
            print("  failed: %s %s" % (status, detail[:120]))
        print("idle for %.0f s after 5 requests (%s):" % (args.idle, PY))
        print("  %-28s %9s %12s %7s %8s" % ("server", "processes", "vol. switches", "CPU %", "RSS MB"))
        for name, procs, switches, cpu, rss in idle_footprint(os.path.join(workdir, "c"), args.idle):
            print("  %-28s %9d %12d %7.2f %8.1f" % (name, procs, switches, cpu, rss))
        if not os.path.exists(PEER_PY):
            print("  (waitress and cheroot skipped: %s not found)" % PEER_PY)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
