"""Sessions: requests/s with tools.sessions.on, minipub vs CherryPy, and idle wake-ups.

    python3 bench/sessions.py [--seconds 3] [--connections 8]

In one run, on 127.0.0.1 only, each server in its own process:
  1. ``/``: a hello-world handler under tools.sessions.on that does not touch the
     session, requests without a cookie (a new visitor each time);
  2. ``/count``: a hit counter (reads and writes the session) with one
     session cookie, so every request loads, locks and saves the same session;
for minipub's memory and sqlite stores and CherryPy's ram and file stores
(CherryPy has no sqlite store).  wrk drives the load (wrk -t2 -cN -dS).
Then the idle wake-up count: voluntary + involuntary context switches of every
thread of an idle server with sessions on, over 5 s, first with no session,
then with one live session (its cleanup timer armed), each window starting 2 s
after the last request.  Stdlib only; CherryPy
comes from the python3 that runs this script (pip install cherrypy).
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

MINIPUB = '''
import sys, minipub
class Root:
    @minipub.expose
    def index(self):
        return "Hello, world!"
    @minipub.expose
    def count(self):
        minipub.session["n"] = minipub.session.get("n", 0) + 1
        return str(minipub.session["n"])
store, path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = minipub.Application(Root(), {"/": {"tools.sessions.on": True, "tools.sessions.storage_type": store,
                                         "tools.sessions.storage_path": path or None}})
minipub.Server(app, "127.0.0.1", port, config=minipub.make_config({"log.screen": False})).serve_forever()
'''

CHERRYPY = '''
import sys, cherrypy
class Root:
    @cherrypy.expose
    def index(self):
        return "Hello, world!"
    @cherrypy.expose
    def count(self):
        cherrypy.session["n"] = cherrypy.session.get("n", 0) + 1
        return str(cherrypy.session["n"])
store, path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
cherrypy.config.update({"server.socket_port": port, "environment": "production", "log.screen": False,
                        "server.thread_pool": 10})
conf = {"/": {"tools.sessions.on": True, "tools.sessions.storage_type": store}}
if path:
    conf["/"]["tools.sessions.storage_path"] = path
cherrypy.quickstart(Root(), "/", conf)
'''


def _start(name, code, store, path, tmp):
    script = os.path.join(tmp, name + ".py")  # start_server formats argv: code with braces goes in a file
    with open(script, "w") as f:
        f.write(code)
    port = common.free_port()
    server = common.start_server(name, [sys.executable, script, store, path, str(port)], port)
    ok, message = common.wait_ready(server, timeout=20)
    if not ok:
        raise RuntimeError("%s: %s\n%s" % (name, message, server.log_tail()))
    return server


def _wrk(url, seconds, connections, cookie=None):
    args = ["wrk", "-t2", "-c%d" % connections, "-d%ds" % seconds, url]
    if cookie:
        args[1:1] = ["-H", "Cookie: " + cookie]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return float(rate.group(1)) if rate else 0.0, int(errors.group(1)) if errors else 0


def _cookie(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/count" % port, timeout=5) as resp:
        return resp.headers["Set-Cookie"].split(";")[0]


def _switches(pid) -> int:
    total = 0
    for status in glob.glob("/proc/%d/task/*/status" % pid):
        try:
            with open(status) as f:
                total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:  # a thread ended meanwhile
            pass
    return total


def _idle(server, seconds=5.0) -> int:
    time.sleep(2)  # the last request's own switches (some 100, within a second) are not idle ones
    before = _switches(server.proc.pid)
    time.sleep(seconds)  # the measurement itself: the server is left alone
    return _switches(server.proc.pid) - before


def main(argv=None) -> int:
    opts = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    opts.add_argument("--seconds", type=int, default=3)
    opts.add_argument("--connections", type=int, default=8)
    args = opts.parse_args(argv)
    if not common.have_tool("wrk"):
        print("wrk is not installed (apt-get install wrk)")
        return 2
    tmp = tempfile.mkdtemp(prefix="minipub-bench-sessions-")
    cases = [("minipub memory", MINIPUB, "memory", ""),
             ("minipub sqlite", MINIPUB, "sqlite", os.path.join(tmp, "s.db")),
             ("cherrypy ram", CHERRYPY, "ram", ""),
             ("cherrypy file", CHERRYPY, "file", tmp)]
    print("%-16s %14s %14s   (wrk -t2 -c%d -d%ds; req/s; non-2xx)" % ("server", "/ hello", "/count",
                                                                   args.connections, args.seconds))
    try:
        for name, code, store, path in cases:
            server = _start(name.replace(" ", "-"), code, store, path, tmp)
            try:
                hello = _wrk(server.url, args.seconds, args.connections)
                count = _wrk(server.url + "count", args.seconds, args.connections, _cookie(server.port))
                print("%-16s %8.0f (%3d) %8.0f (%3d)" % (name, hello[0], hello[1], count[0], count[1]))
            finally:
                common.stop_server(server)
        for name, code, store in (("minipub", MINIPUB, "memory"), ("cherrypy", CHERRYPY, "ram")):
            server = _start(name + "-idle", code, store, "", tmp)
            try:
                empty = _idle(server)
                _cookie(server.port)
                live = _idle(server)
                print("idle wake-ups in 5 s, %-8s: %d with no session, %d with one live session" % (name, empty, live))
            finally:
                common.stop_server(server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
