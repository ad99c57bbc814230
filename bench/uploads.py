"""Big uploads and a big static download: minipub vs CherryPy, cheroot and waitress.

    python3 bench/uploads.py [--size-mib 1024] [--each-mib 128] [--clients 8] [--only a,b]

For each server, in one run, on 127.0.0.1 only, each step bounded by curl's
--max-time:
  1. one upload of a SIZE MiB file with ``curl -F f=@file`` (MB/s, and the
     server's peak RSS growth, sampled from /proc/PID/status every 10 ms);
  2. CLIENTS concurrent uploads of EACH MiB (all must arrive whole);
  3. a download of the SIZE MiB file with curl (GB/s, peak RSS growth).
minipub and CherryPy run their framework (multipart parsing into temporary
files, StaticDir / tools.staticdir); cheroot and waitress run a bare WSGI app
that counts wsgi.input and answers files with wsgi.file_wrapper.  The test
files are made in /tmp and deleted at the end.  Stdlib only; the peers come
from bench/.venv (see setup.sh).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

MiB = 1 << 20
SERVERS = ("minipub", "cherrypy", "cheroot", "waitress")


# ------------------------------------------------------------ the servers

def _count_parts(parts):
    """{'f': bytes} of the uploaded files, read back in blocks (as a handler would)."""
    sizes = {}
    for name, part in parts.items():
        size, f = 0, part.file
        while True:
            block = f.read(MiB)
            if not block:
                break
            size += len(block)
        sizes[name] = size
    return sizes


def _blocks(f, size):
    with f:
        while True:
            block = f.read(size)
            if not block:
                return
            yield block


def _raw_app(static_dir):
    def app(environ, start_response):
        if environ["PATH_INFO"].startswith("/static/"):
            path = os.path.join(static_dir, os.path.basename(environ["PATH_INFO"]))
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(os.path.getsize(path)))])
            wrapper = environ.get("wsgi.file_wrapper", _blocks)  # cheroot has none
            return wrapper(open(path, "rb"), 256 * 1024)
        size, body = 0, environ["wsgi.input"]
        left = int(environ.get("CONTENT_LENGTH") or 0)
        while left > 0:
            block = body.read(min(left, 256 * 1024))
            if not block:
                break
            size += len(block)
            left -= len(block)
        data = json.dumps({"f": size}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]
    return app


def serve(name, port, static_dir):
    """Run one server in this process until SIGTERM."""
    if name == "minipub":
        sys.path.insert(0, common.REPO)
        import minipub

        class Root:
            static = minipub.StaticDir(static_dir)

            @minipub.expose
            def upload(self, **params):
                return _count_parts(params)
        config = {"server.max_request_body_size": 0, "log.screen": False}
        minipub.Server(minipub.Application(Root(), config), common.HOST, port,
                       config=config).serve_forever()
    elif name == "cherrypy":
        import cherrypy

        class Root:
            @cherrypy.expose
            def upload(self, **params):
                cherrypy.response.headers["Content-Type"] = "application/json"
                return json.dumps(_count_parts(params)).encode()
        cherrypy.config.update({"environment": "production", "log.screen": False,
                                "server.socket_host": common.HOST, "server.socket_port": port,
                                "server.max_request_body_size": 0, "server.thread_pool": 10})
        cherrypy.quickstart(Root(), "/", {"/static": {"tools.staticdir.on": True,
                                                      "tools.staticdir.dir": static_dir}})
    elif name == "cheroot":
        from cheroot import wsgi
        server = wsgi.Server((common.HOST, port), _raw_app(static_dir), numthreads=10)
        try:
            server.safe_start()
        finally:
            server.stop()
    elif name == "waitress":
        import waitress
        waitress.serve(_raw_app(static_dir), host=common.HOST, port=port, threads=10,
                       max_request_body_size=1 << 40, _quiet=True)


# ------------------------------------------------------------ measuring

def rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


class PeakRSS:
    """Samples a process's VmRSS every 10 ms while the block runs: peak growth in MB."""

    def __init__(self, pid):
        self.pid, self.base, self.peak, self.stop = pid, rss_kib(pid), 0, threading.Event()

    def _run(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_kib(self.pid))

    @property
    def growth_mb(self):
        return max(0, self.peak - self.base) / 1024.0


def curl_upload(url, path, timeout=300):
    argv = ["curl", "-sS", "--max-time", str(timeout), "-F", "f=@%s" % path, url]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def check_upload(proc, expected, timeout=320):
    """The file arrived whole (the bare WSGI apps count the multipart framing too)."""
    out, err = proc.communicate(timeout=timeout)
    try:
        return expected <= json.loads(out).get("f") < expected + 1024
    except ValueError:
        common.log("  bad answer: %r %r" % (out[:200], err[:200]))
        return False


def make_file(path, mib):
    """SIZE MiB of random-looking data, built from a repeated 16 MiB random block (quick to write)."""
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for i in range(mib // 16):
            f.write(block)
        f.write(block[:(mib % 16) * MiB])


def measure(name, big, each, clients, static_dir, python):
    port = common.free_port()
    argv = [python, os.path.abspath(__file__), "--serve", name, str(port), static_dir]
    server = common.start_server("uploads-" + name, argv, port)
    try:
        deadline = time.monotonic() + 20
        while not _accepting(port):
            if server.proc.poll() is not None or time.monotonic() > deadline:
                return {"error": "did not start: " + server.log_tail()}
            time.sleep(0.05)
        row, pid, url = {}, server.proc.pid, "http://%s:%d" % (common.HOST, port)
        size_big, size_each = os.path.getsize(big), os.path.getsize(each)
        os.sync()  # no writeback of earlier files (ours, or the last server's) during a step
        with PeakRSS(pid) as rss:
            start = time.monotonic()
            ok = check_upload(curl_upload(url + "/upload", big), size_big)
            seconds = time.monotonic() - start
        row["upload_MBps"] = size_big / seconds / 1e6 if ok else None
        row["upload_rss_MB"] = rss.growth_mb
        os.sync()
        with PeakRSS(pid) as rss:
            start = time.monotonic()
            procs = [curl_upload(url + "/upload", each) for _ in range(clients)]
            oks = [check_upload(p, size_each) for p in procs]
            seconds = time.monotonic() - start
        row["concurrent_ok"] = "%d/%d" % (sum(oks), clients)
        row["concurrent_MBps"] = clients * size_each / seconds / 1e6
        row["concurrent_rss_MB"] = rss.growth_mb
        os.sync()
        with PeakRSS(pid) as rss:
            code, out, err = common.run_cmd(
                ["curl", "-sS", "--max-time", "120", "-o", "/dev/null", "-w",
                 "%{http_code} %{size_download} %{time_total}", url + "/static/" + os.path.basename(big)],
                timeout=130)
        status, size, seconds = (out.split() + ["0", "0", "1"])[:3]
        whole = status == "200" and int(size) == size_big
        row["download_GBps"] = int(size) / float(seconds) / 1e9 if whole else None
        row["download_rss_MB"] = rss.growth_mb
        return row
    finally:
        common.stop_server(server)


def _accepting(port):
    import socket
    try:
        with socket.create_connection((common.HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def report(results, args):
    cols = ["upload_MBps", "upload_rss_MB", "concurrent_ok", "concurrent_MBps", "concurrent_rss_MB",
            "download_GBps", "download_rss_MB"]
    print("1 x %d MiB curl -F upload; %d x %d MiB concurrent; %d MiB curl download"
          % (args.size_mib, args.clients, args.each_mib, args.size_mib))
    print("%-9s" % "server" + "".join("%19s" % c for c in cols))
    for name, row in results.items():
        if "error" in row:
            print("%-9s %s" % (name, row["error"][:300]))
            continue
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("%19s" % ("FAILED" if v is None else v if isinstance(v, str) else "%.2f" % v))
        print("%-9s" % name + "".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", nargs=3, metavar=("NAME", "PORT", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--each-mib", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--only", default=",".join(SERVERS))
    parser.add_argument("--python", default=common.VENV_PY,
                        help="interpreter with cheroot, cherrypy and waitress (default: bench/.venv)")
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve[0], int(args.serve[1]), args.serve[2])
    if args.python == common.VENV_PY:
        common.ensure_venv(quiet=True)
    work = tempfile.mkdtemp(prefix="minipub-bench-uploads-", dir="/tmp")
    big, each = os.path.join(work, "big.bin"), os.path.join(work, "each.bin")
    results = {}
    try:
        make_file(big, args.size_mib)
        make_file(each, args.each_mib)
        for name in args.only.split(","):
            common.log("%s ..." % name)
            results[name] = measure(name, big, each, args.clients, work, args.python)
    finally:
        for path in (big, each):
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(work)
    report(results, args)
    os.makedirs(common.RESULTS, exist_ok=True)
    with open(os.path.join(common.RESULTS, "uploads.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
