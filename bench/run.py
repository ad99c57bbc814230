#!/usr/bin/env python3
"""Hello-world benchmark: minipub against its peers, interleaved.

usage: python3 bench/run.py [--quick] [--rounds N] [--duration S]
                            [--requests N] [--threads T] [--only a,b]
                            [--seed N] [--no-import] [--no-copy] [--list]

Stdlib only. Each round starts every server once, in a shuffled order, on a
free 127.0.0.1 port, and runs the same load scenarios against it:

  wrk-c10   wrk -t2 -c10  -dDs --latency   keep-alive, 10 connections
  wrk-c100  wrk -t2 -c100 -dDs --latency   keep-alive, 100 connections
  ab-c10    ab -n N -c 10                  a new connection per request

It prints per server the median over rounds, the ratios minipub / best peer,
and the cost of `import minipub` (and of some peers).  With valgrind installed
it also counts instructions per keep-alive request of each server process
(callgrind, bench/instr_per_req.py, --instr N requests; --instr 0 skips it):
unlike req/s that figure does not depend on what else the machine is doing. Results go to
bench/results/latest.json and bench/results/hello.svg (chart copied to
bench/hello.svg unless --no-copy).
"""

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (HELLO, REPO, RESULTS, HERE, VENV_PY, fmt, free_port,  # noqa: E402
                    median, ratio, start_server, stop_server, wait_ready,
                    warm_up, log)

MINIPUB_FILE = os.path.join(REPO, "minipub.py")


# ----------------------------------------------------------------- the specs

class ServerSpec:
    """One server under test.

    argv may contain '{port}' (filled in at start); '{threads}' and '{py}'
    are filled in from the run's options. `fallback` is another argv tried
    when argv does not come up (e.g. minipub's CLI is not usable yet).
    """

    def __init__(self, name, argv, env=None, cwd=None, minipub=False,
                 fallback=None, note=""):
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd or REPO
        self.minipub = minipub
        self.fallback = fallback
        self.note = note

    def resolve(self, argv, threads, py):
        out = []
        for a in argv:
            a = str(a).replace("{threads}", str(threads)).replace("{py}", py)
            out.append(a)
        return out


def server_specs():
    vb = common.venv_bin
    return [
        ServerSpec("minipub",
                   ["{py}", "minipub.py", "bench.apps:Root", "--port", "{port}",
                    "--threads", "{threads}", "--config", "bench/minipub.ini"],
                   minipub=True,
                   fallback=["{py}", "bench/serve_minipub_app.py", "{port}", "{threads}"],
                   note="full stack via CLI (Root/expose)"),
        ServerSpec("minipub-w2",
                   ["{py}", "minipub.py", "bench.apps:Root", "--port", "{port}",
                    "--threads", "{threads}", "--config", "bench/minipub.ini", "--workers", "2"],
                   minipub=True, note="the CLI with --workers 2 (two processes, one socket)"),
        ServerSpec("minipub-wsgi",
                   ["{py}", "bench/serve_minipub_wsgi.py", "{port}", "{threads}"],
                   minipub=True, note="minipub.Server + bare WSGI app"),
        ServerSpec("cheroot",
                   ["{py}", "-m", "bench.apps", "cheroot", "{port}", "{threads}"],
                   note="cheroot.wsgi.Server + bare WSGI app"),
        ServerSpec("waitress",
                   ["{py}", "-m", "bench.apps", "waitress", "{port}", "{threads}"],
                   note="waitress.serve + bare WSGI app (queue warnings off)"),
        ServerSpec("gunicorn-gthread",
                   [vb("gunicorn"), "-k", "gthread", "-w", "1", "--threads", "{threads}",
                    "-b", "127.0.0.1:{port}", "--log-level", "warning",
                    "bench.apps:hello_wsgi"],
                   note="gunicorn 1 worker x threads"),
        ServerSpec("gunicorn-gthread2",
                   [vb("gunicorn"), "-k", "gthread", "-w", "2", "--threads", "{threads}",
                    "-b", "127.0.0.1:{port}", "--log-level", "warning",
                    "bench.apps:hello_wsgi"],
                   note="gunicorn 2 workers x threads"),
        ServerSpec("gunicorn-sync2",
                   [vb("gunicorn"), "-k", "sync", "-w", "2",
                    "-b", "127.0.0.1:{port}", "--log-level", "warning",
                    "bench.apps:hello_wsgi"],
                   note="gunicorn 2 sync worker processes"),
        ServerSpec("bottle",
                   ["{py}", "-m", "bench.apps", "bottle", "{port}", "{threads}"],
                   note="bottle on wsgiref (single thread)"),
        ServerSpec("cherrypy",
                   ["{py}", "-m", "bench.apps", "cherrypy", "{port}", "{threads}"],
                   note="CherryPy quickstart, production"),
    ]


# ------------------------------------------------------------------ scenarios

class Scenario:
    def __init__(self, name, label, tool, run):
        self.name = name
        self.label = label
        self.tool = tool
        self.run = run  # run(url, args) -> dict


def scenarios():
    return [
        Scenario("wrk-c10", "wrk c10 keep-alive", "wrk",
                 lambda url, a: common.run_wrk(url, connections=10, threads=2,
                                               duration=a.duration)),
        Scenario("wrk-c100", "wrk c100 keep-alive", "wrk",
                 lambda url, a: common.run_wrk(url, connections=100, threads=2,
                                               duration=a.duration)),
        Scenario("ab-c10", "ab c10 new conn", "ab",
                 lambda url, a: common.run_ab(url, requests=a.requests,
                                              concurrency=10)),
    ]


# ---------------------------------------------------------------- one server

def bench_one(spec, argv, scens, args, py):
    """Start the server, run every scenario, stop it. Returns a dict."""
    port = free_port()
    resolved = spec.resolve(argv, args.threads, py)
    log_name = spec.name + ("-fallback" if argv is spec.fallback else "")
    srv = start_server(log_name, resolved, port, env=common.bench_env(spec.env),
                       cwd=spec.cwd)
    out = {"argv": " ".join(srv.argv), "scenarios": {}}
    t0 = time.monotonic()
    ok, msg = wait_ready(srv, timeout=args.ready_timeout, expect_body=HELLO)
    out["ready_s"] = round(time.monotonic() - t0, 3)
    if not ok:
        stop_server(srv)
        out["error"] = "%s\n%s" % (msg, srv.log_tail())
        return out
    try:
        warm_up(srv.url, seconds=1)
        for sc in scens:
            if srv.proc.poll() is not None:
                out["scenarios"][sc.name] = {"error": "server died (exit %s)"
                                             % srv.proc.returncode}
                continue
            if not common.have_tool(sc.tool):
                out["scenarios"][sc.name] = {"error": "%s not installed" % sc.tool}
                continue
            out["scenarios"][sc.name] = sc.run(srv.url, args)
        if srv.proc.poll() is not None:
            out["died"] = "server exited with %s during the run\n%s" % (
                srv.proc.returncode, srv.log_tail())
    finally:
        t1 = time.monotonic()
        rc = stop_server(srv)
        out["stop_s"] = round(time.monotonic() - t1, 3)
        out["exit_code"] = rc
    return out


# --------------------------------------------------------------- import cost

def _clean_venv():
    """A venv with nothing installed (no pip), for the minipub import figure."""
    path = os.path.join(HERE, ".venv-clean")
    py = os.path.join(path, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", path],
                       check=True, capture_output=True)
    return py


def _importtime_cumulative(stderr, module):
    """Cumulative microseconds of the top-level `module` line of -X importtime."""
    best = None
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3:
            continue
        name = parts[2]
        if name.strip() == module and name.startswith(" ") and not name.startswith("  "):
            try:
                best = int(parts[1])
            except ValueError:
                pass
    return best


def measure_import(py, module, path=None, runs=15):
    """Median wall-clock cost of `import module` over a bare `-I` start,
    plus the -X importtime cumulative figure. Runs are interleaved."""
    prefix = "import sys; sys.path.insert(0, %r)" % path if path else "pass"
    # -I: no cwd/user site/PYTHON* variables; the .pyc files of the repo's
    # minipub.py go to bench/results/pycache instead of the repo root
    py_ = [py, "-I", "-X", "pycache_prefix=" + common.PYCACHE]
    base = py_ + ["-c", prefix]
    imp = py_ + ["-c", "%s; import %s" % (prefix, module)]
    imt = py_ + ["-X", "importtime", "-c", "%s; import %s" % (prefix, module)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # one untimed run to write .pyc files
    first = subprocess.run(imp, capture_output=True, text=True, env=env, timeout=60)
    if first.returncode != 0:
        return {"error": first.stderr.strip().splitlines()[-1:] or ["failed"]}
    tb, ti, cum = [], [], []
    for _ in range(runs):
        for argv, acc in ((base, tb), (imp, ti)):
            t = time.perf_counter()
            subprocess.run(argv, capture_output=True, env=env, timeout=60)
            acc.append((time.perf_counter() - t) * 1000)
        p = subprocess.run(imt, capture_output=True, text=True, env=env, timeout=60)
        c = _importtime_cumulative(p.stderr, module)
        if c is not None:
            cum.append(c / 1000.0)
    return {
        "bare_start_ms": median(tb),
        "with_import_ms": median(ti),
        "added_ms": median(ti) - median(tb),
        "importtime_cumulative_ms": median(cum),
        "runs": runs,
        "python": py,
    }


def import_costs(runs):
    res = {}
    if os.path.exists(MINIPUB_FILE):
        try:
            clean = _clean_venv()
        except Exception as e:  # venv module missing etc.
            log("import: clean venv failed (%s); using the bench venv" % e)
            clean = VENV_PY
        res["minipub"] = measure_import(clean, "minipub", path=REPO, runs=runs)
        res["minipub"]["venv"] = "clean (no packages)"
    else:
        res["minipub"] = {"error": "minipub.py not found"}
    for mod in ("bottle", "waitress", "cherrypy"):
        res[mod] = measure_import(VENV_PY, mod, runs=runs)
        res[mod]["venv"] = "bench/.venv"
    return res


# ------------------------------------------------------------------ summary

def summarize(raw, specs, scens):
    """Medians per server/scenario and minipub/best-peer ratios."""
    med = {}
    for spec in specs:
        rounds = raw.get(spec.name, [])
        med[spec.name] = {}
        for sc in scens:
            vals = [r["scenarios"].get(sc.name, {}) for r in rounds
                    if "scenarios" in r]
            good = [v for v in vals if v.get("rps") is not None]
            med[spec.name][sc.name] = {
                "rps": median([v["rps"] for v in good]),
                "p99_ms": median([v.get("p99_ms") for v in good]),
                "p50_ms": median([v.get("p50_ms") for v in good]),
                "errors": sum((v.get("non2xx") or 0) + (v.get("socket_errors") or 0)
                              for v in good),
                "rounds_ok": len(good),
                "rounds": len(rounds),
                "failures": [v["error"] for v in vals if v.get("error")],
            }
    peers = [s.name for s in specs if not s.minipub]
    mins = [s.name for s in specs if s.minipub]
    ratios = {}
    for m in mins:
        ratios[m] = {}
        for sc in scens:
            mine = med[m][sc.name]
            peer_rps = [(med[p][sc.name]["rps"], p) for p in peers
                        if med[p][sc.name]["rps"] is not None]
            peer_p99 = [(med[p][sc.name]["p99_ms"], p) for p in peers
                        if med[p][sc.name]["p99_ms"] is not None]
            best = max(peer_rps) if peer_rps else (None, None)
            lowest = min(peer_p99) if peer_p99 else (None, None)
            # paired per round: minipub vs the best peer of the same round
            paired = []
            for i, r in enumerate(raw.get(m, [])):
                mr = r.get("scenarios", {}).get(sc.name, {}).get("rps")
                pr = [raw[p][i]["scenarios"].get(sc.name, {}).get("rps")
                      for p in peers if i < len(raw.get(p, []))
                      and "scenarios" in raw[p][i]]
                pr = [x for x in pr if x is not None]
                if mr is not None and pr:
                    paired.append(mr / max(pr))
            ratios[m][sc.name] = {
                "best_peer": best[1], "best_peer_rps": best[0],
                "rps_ratio": ratio(mine["rps"], best[0]),
                "rps_ratio_paired_median": median(paired),
                "lowest_p99_peer": lowest[1], "lowest_p99_ms": lowest[0],
                "p99_ratio": ratio(mine["p99_ms"], lowest[0]),
            }
    return med, ratios


def format_imports(imports):
    runs = max(v.get("runs", 0) for v in imports.values())
    lines = ["import cost (median of %d runs, python -I; added = with import"
             " - bare start; target for minipub: < 15 ms):" % runs]
    for mod, r in imports.items():
        if "error" in r:
            lines.append("  %-10s %s" % (mod, r["error"]))
            continue
        lines.append("  %-10s added %6.1f ms  (-X importtime cumulative %6.1f ms; "
                     "bare start %.1f ms; %s)"
                     % (mod, r["added_ms"], r["importtime_cumulative_ms"] or 0,
                        r["bare_start_ms"], r["venv"]))
    return "\n".join(lines)


def count_instructions(spec, argv, py, n, threads):
    """Instructions per keep-alive request of the server process (callgrind), or None."""
    if not n or not shutil.which("valgrind"):
        return None
    cmd = " ".join(spec.resolve(argv, threads, py))  # '{port}' is filled in by instr_per_req.py
    try:
        out = subprocess.run([sys.executable, os.path.join(HERE, "instr_per_req.py"), cmd, str(n),
                              "--cwd", spec.cwd, "--json"], capture_output=True, text=True,
                             timeout=900, env=common.bench_env(spec.env))
        return json.loads(out.stdout.strip().splitlines()[-1])["instr_per_req"]
    except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError):
        return None


def format_table(med, ratios, specs, scens, failures, imports, meta):
    lines = []
    w = 17
    lines.append("Hello world on 127.0.0.1: median of %d round(s); %ss wrk runs, "
                 "ab -n %d; %d threads where a server has threads"
                 % (meta["rounds"], meta["duration_s"], meta["ab_requests"],
                    meta["threads"]))
    lines.append("cell = req/s  p99  [errors]")
    instr = meta.get("instr_per_req") or {}
    head = "%-*s" % (w, "server") + "".join("| %-27s" % sc.label for sc in scens)
    head += "| instr/req" if instr else ""
    lines.append(head)
    lines.append("-" * len(head))
    for spec in specs:
        cells = []
        for sc in scens:
            m = med[spec.name][sc.name]
            if m["rps"] is None:
                cells.append("| %-27s" % "failed")
                continue
            err = m["errors"]
            cell = "%8s %9s" % (fmt(m["rps"]), fmt(m["p99_ms"], "{:.2f}ms"))
            if err:
                cell += " [%d]" % err
            cells.append("| %-27s" % cell)
        if instr:
            cells.append("| %s" % fmt(instr.get(spec.name)))
        lines.append("%-*s" % (w, spec.name) + "".join(cells))
    lines.append("")
    for m, per in ratios.items():
        lines.append("%s / best peer:" % m)
        for sc in scens:
            r = per[sc.name]
            lines.append("  %-20s req/s x%s (paired x%s) vs %s;  p99 x%s vs %s"
                         % (sc.label, fmt(r["rps_ratio"], "{:.2f}"),
                            fmt(r["rps_ratio_paired_median"], "{:.2f}"),
                            r["best_peer"] or "-",
                            fmt(r["p99_ratio"], "{:.2f}"),
                            r["lowest_p99_peer"] or "-"))
    lines.append("  (req/s ratio > 1: minipub faster; p99 ratio < 1: minipub's "
                 "tail lower)")
    if imports:
        lines.append("")
        lines.append(format_imports(imports))
    if failures:
        lines.append("")
        lines.append("failures:")
        for f in failures:
            lines.append("  " + f.replace("\n", "\n    ").rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------- SVG

def _esc(s):
    return (str(s).replace("&", "&amp;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&quot;"))


def render_svg(med, specs, scens, meta):
    width = 760
    label_w = 150
    bar_w = 400
    row_h = 22
    panel_gap = 18
    top = 48
    parts = []
    y = top
    for sc in scens:
        rows = [(s, med[s.name][sc.name]) for s in specs]
        vmax = max([m["rps"] for _, m in rows if m["rps"]] or [1])
        parts.append('<text x="12" y="%d" class="h">%s</text>' % (y + 14, _esc(sc.label)))
        y += 24
        for s, m in rows:
            cls = "mp" if s.minipub else "peer"
            parts.append('<text x="%d" y="%d" class="l" text-anchor="end">%s</text>'
                         % (label_w - 8, y + 15, _esc(s.name)))
            if m["rps"] is None:
                parts.append('<text x="%d" y="%d" class="v">failed</text>'
                             % (label_w + 4, y + 15))
            else:
                w = max(1.0, bar_w * m["rps"] / vmax)
                parts.append('<rect x="%d" y="%d" width="%.1f" height="%d" class="%s">'
                             '<title>%s: %s req/s, p99 %s</title></rect>'
                             % (label_w, y + 3, w, row_h - 6, cls, _esc(s.name),
                                fmt(m["rps"]), fmt(m["p99_ms"], "{:.2f} ms")))
                parts.append('<text x="%.1f" y="%d" class="v">%s req/s · p99 %s</text>'
                             % (label_w + w + 6, y + 15, fmt(m["rps"]),
                                fmt(m["p99_ms"], "{:.2f} ms")))
            y += row_h
        y += panel_gap
    height = y + 24
    title = "minipub hello world vs peers (median req/s, higher is better)"
    foot = ("%s · %d round(s) · %ss wrk, ab -n %d · %d threads · Python %s · %d CPU · "
            "loopback" % (meta["date"][:10], meta["rounds"], meta["duration_s"],
                          meta["ab_requests"], meta["threads"], meta["python"],
                          meta["cpus"]))
    svg = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
        'viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif">'
        % (width, height, width, height),
        '<style>.h{font-size:14px;font-weight:bold;fill:#222}'
        '.l{font-size:12px;fill:#333}.v{font-size:11px;fill:#444}'
        '.t{font-size:15px;font-weight:bold;fill:#111}.f{font-size:10px;fill:#777}'
        '.mp{fill:#e8590c}.peer{fill:#5c7cfa}</style>',
        '<rect width="100%" height="100%" fill="#fff"/>',
        '<text x="12" y="24" class="t">%s</text>' % _esc(title),
        '<rect x="%d" y="32" width="10" height="10" class="mp"/>'
        '<text x="%d" y="41" class="l">minipub</text>' % (width - 170, width - 156),
        '<rect x="%d" y="32" width="10" height="10" class="peer"/>'
        '<text x="%d" y="41" class="l">peers</text>' % (width - 90, width - 76),
    ] + parts + [
        '<text x="12" y="%d" class="f">%s</text>' % (height - 10, _esc(foot)),
        '</svg>',
    ]
    return "\n".join(svg) + "\n"


# --------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 round, 3 s wrk runs, ab -n 2000, 7 import runs")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=int, help="seconds per wrk run")
    p.add_argument("--requests", type=int, help="ab request count")
    p.add_argument("--threads", type=int, default=10)
    p.add_argument("--only", help="comma-separated server names")
    p.add_argument("--seed", type=int, help="shuffle seed (default: time)")
    p.add_argument("--ready-timeout", type=float, default=15.0)
    p.add_argument("--import-runs", type=int)
    p.add_argument("--no-import", action="store_true", help="skip import cost")
    p.add_argument("--import-only", action="store_true",
                   help="only measure the import cost (no servers)")
    p.add_argument("--no-copy", action="store_true",
                   help="do not copy the chart to bench/hello.svg")
    p.add_argument("--copy", action="store_true",
                   help="copy the chart to bench/hello.svg even with --quick/--only")
    p.add_argument("--render", metavar="JSON",
                   help="re-draw the chart (and bench/hello.svg) from a saved "
                        "results JSON, run nothing")
    p.add_argument("--list", action="store_true", help="list servers and exit")
    p.add_argument("--instr", type=int, default=2000, metavar="N",
                   help="instructions/request over N keep-alive requests under callgrind "
                        "(when valgrind is installed; 0: skip)")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.duration = a.duration or (3 if a.quick else 5)
    a.requests = a.requests or (2000 if a.quick else 5000)
    a.import_runs = a.import_runs or (7 if a.quick else 15)
    if a.seed is None:
        a.seed = int(time.time())
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    specs = server_specs()
    if args.list:
        for s in specs:
            print("%-17s %s" % (s.name, s.note))
        return 0
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in want if n not in {s.name for s in specs}]
        if unknown:
            print("unknown server(s): %s; known: %s"
                  % (", ".join(unknown), ", ".join(s.name for s in specs)))
            return 2
        specs = [s for s in specs if s.name in want]
    for tool in ("wrk", "ab"):
        if not common.have_tool(tool):
            log("warning: %s not found (apt-get install -y wrk apache2-utils); "
                "its scenarios will be reported as failed" % tool)

    if args.render:
        return render_saved(args.render)
    py = common.ensure_venv()
    if args.import_only:
        imports = import_costs(args.import_runs)
        print(format_imports(imports))
        return 0
    os.makedirs(RESULTS, exist_ok=True)
    if os.path.isdir(common.LOGS):
        shutil.rmtree(common.LOGS, ignore_errors=True)
    scens = scenarios()
    rng = random.Random(args.seed)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "rounds": args.rounds, "duration_s": args.duration,
        "ab_requests": args.requests, "threads": args.threads, "seed": args.seed,
        "quick": args.quick, "cpus": os.cpu_count(),
        "python": common.python_version(py) or "?",
        "platform": platform.platform(),
        "peers": common.package_versions(py, ["cheroot", "waitress", "gunicorn",
                                              "bottle", "CherryPy"]),
        "minipub_present": os.path.exists(MINIPUB_FILE),
        "servers": {s.name: s.note for s in specs},
    }
    try:
        meta["minipub_git"] = subprocess.run(
            ["git", "-C", REPO, "log", "-1", "--format=%h", "--", "minipub.py"],
            capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        meta["minipub_git"] = None
    est = args.rounds * len(specs) * (2 * args.duration + 3 + args.requests / 1500.0)
    log("bench: %d round(s) x %d server(s), seed %d, about %.0f s of load"
        % (args.rounds, len(specs), args.seed, est))

    raw = {s.name: [] for s in specs}
    chosen = {s.name: s.argv for s in specs}  # argv that worked (or to try)
    dead = {}
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        order = specs[:]
        rng.shuffle(order)
        log("round %d/%d: %s" % (rnd + 1, args.rounds, " ".join(s.name for s in order)))
        for spec in order:
            if spec.name in dead:
                raw[spec.name].append({"error": "skipped: failed earlier",
                                       "scenarios": {}})
                log("  %-17s skipped (failed earlier)" % spec.name)
                continue
            res = bench_one(spec, chosen[spec.name], scens, args, py)
            if "error" in res and spec.fallback and chosen[spec.name] is spec.argv:
                log("  %s: %s; trying fallback" % (spec.name, res["error"].splitlines()[0]))
                first_error = res["error"]
                res = bench_one(spec, spec.fallback, scens, args, py)
                res["primary_error"] = first_error
                if "error" not in res:
                    chosen[spec.name] = spec.fallback
                    res["variant"] = "fallback"
            elif chosen[spec.name] is spec.fallback:
                res["variant"] = "fallback"
            res["round"] = rnd + 1
            raw[spec.name].append(res)
            if "error" in res:
                dead[spec.name] = res["error"]
                log("  %-17s FAILED: %s" % (spec.name, res["error"].splitlines()[0]))
                continue
            summ = "  ".join("%s %s/s p99 %s%s" % (
                sc.name, fmt(res["scenarios"][sc.name].get("rps")),
                fmt(res["scenarios"][sc.name].get("p99_ms"), "{:.1f}ms"),
                " ERR" if res["scenarios"][sc.name].get("error") else "")
                for sc in scens)
            log("  %-17s %s%s" % (spec.name, summ,
                                  " (fallback)" if res.get("variant") else ""))
    meta["load_seconds"] = round(time.monotonic() - t_start, 1)
    if args.instr and shutil.which("valgrind"):
        log("counting instructions per request under callgrind (%d requests each)" % args.instr)
        meta["instr_per_req"] = {s.name: count_instructions(s, chosen[s.name], py, args.instr, args.threads)
                                 for s in specs if s.name not in dead}

    imports = {}
    if not args.no_import:
        log("measuring import cost (%d runs each)" % args.import_runs)
        imports = import_costs(args.import_runs)

    med, ratios = summarize(raw, specs, scens)
    failures = []
    for s in specs:
        for r in raw[s.name]:
            if r.get("primary_error") and r.get("variant") == "fallback":
                failures.append("%s: primary command failed, fallback used: %s"
                                % (s.name, r["primary_error"].splitlines()[0]))
            if r.get("primary_error") and r.get("error"):
                failures.append("%s (round %s), primary command: %s"
                                % (s.name, r.get("round"), r["primary_error"].strip()))
            if r.get("error") and not r["error"].startswith("skipped"):
                failures.append("%s (round %s)%s: %s\n    command: %s"
                                % (s.name, r.get("round"),
                                   ", fallback command" if r.get("primary_error") else "",
                                   r["error"].strip(), r["argv"]))
            if r.get("exit_code") == -9:
                failures.append("%s (round %s): did not exit within 5 s of SIGTERM; "
                                "killed" % (s.name, r.get("round")))
            if r.get("died"):
                failures.append("%s (round %s): %s" % (s.name, r.get("round"), r["died"]))
            for scn, v in r.get("scenarios", {}).items():
                if v.get("error"):
                    failures.append("%s %s (round %s): %s"
                                    % (s.name, scn, r.get("round"), v["error"]))
    table = format_table(med, ratios, specs, scens, failures, imports, meta)
    print(table)

    doc = {"meta": meta, "medians": med, "ratios": ratios, "imports": imports,
           "raw": raw}
    with open(os.path.join(RESULTS, "latest.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    stamp = re.sub(r"[^0-9T]", "", meta["date"][:19])
    with open(os.path.join(RESULTS, "hello-%s.json" % stamp), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    with open(os.path.join(RESULTS, "latest.txt"), "w") as f:
        f.write(table + "\n")
    svg = render_svg(med, specs, scens, meta)
    with open(os.path.join(RESULTS, "hello.svg"), "w") as f:
        f.write(svg)
    # the committed chart comes from full runs only, unless asked
    copy = args.copy or not (args.no_copy or args.quick or args.only)
    if copy:
        shutil.copyfile(os.path.join(RESULTS, "hello.svg"), os.path.join(HERE, "hello.svg"))
    log("wrote %s, %s%s" % (os.path.join(RESULTS, "latest.json"),
                            os.path.join(RESULTS, "hello.svg"),
                            ", bench/hello.svg" if copy else ""))
    return 0


def render_saved(path):
    """Chart and table from a saved results JSON (e.g. an earlier full run)."""
    with open(path) as f:
        doc = json.load(f)
    names = list(doc["medians"])
    specs = [s for s in server_specs() if s.name in names]
    scens = scenarios()
    print(format_table(doc["medians"], doc["ratios"], specs, scens, [],
                       doc.get("imports") or {}, doc["meta"]))
    svg = render_svg(doc["medians"], specs, scens, doc["meta"])
    os.makedirs(RESULTS, exist_ok=True)
    for out in (os.path.join(RESULTS, "hello.svg"), os.path.join(HERE, "hello.svg")):
        with open(out, "w") as f:
            f.write(svg)
    log("wrote %s and bench/hello.svg from %s" % (os.path.join(RESULTS, "hello.svg"), path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
