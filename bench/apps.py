"""Hello-world applications for the benchmark, one per server.

Every app answers GET / with the 13-byte body ``Hello, world!``.

* ``Root``          - minipub full stack, served by minipub's CLI:
                      ``python minipub.py bench.apps:Root --port P --threads T
                      --config bench/minipub.ini`` (from the repo root).
* ``hello_wsgi``    - a bare PEP 3333 callable, used for minipub.Server
                      (bench/serve_minipub_wsgi.py), cheroot, waitress and
                      gunicorn.
* ``serve_waitress``- waitress.serve around ``hello_wsgi``, queue warnings off.
* ``serve_bottle``  - bottle on its default wsgiref server.
* ``serve_cherrypy``- CherryPy's own full stack (quickstart, production).
* ``serve_cheroot`` - cheroot.wsgi.Server around ``hello_wsgi``.

Peers that need a launcher run as ``python -m bench.apps NAME PORT THREADS``.
Third-party imports are done inside the launchers so that this module
imports with the standard library alone (and with or without minipub).
"""

import sys

HELLO = b"Hello, world!"
HELLO_STR = HELLO.decode()
HOST = "127.0.0.1"


def hello_wsgi(environ, start_response):
    """Plain PEP 3333 hello world."""
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(HELLO)))])
    return [HELLO]


def _make_root():
    import minipub

    class Root:
        """minipub full stack: object dispatch, exposed handler."""

        @minipub.expose
        def index(self):
            return "Hello, world!"

    return Root


def __getattr__(name):
    # ``Root`` is built on first access (``bench.apps:Root`` or
    # ``from bench.apps import Root``), so the peers' processes never import
    # minipub, and a half-written minipub.py cannot break them.
    if name == "Root":
        global Root
        Root = _make_root()
        return Root
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


# ------------------------------------------------------------------ launchers

def serve_cheroot(port, threads):
    from cheroot import wsgi
    server = wsgi.Server((HOST, port), hello_wsgi, numthreads=threads)
    try:
        server.start()  # blocks
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def serve_waitress(port, threads):
    import logging
    import waitress
    # waitress warns "Task queue depth is N" for every queued request under
    # load; the other servers log nothing, so neither does waitress here.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    waitress.serve(hello_wsgi, host=HOST, port=port, threads=threads,
                   _quiet=True)


def serve_bottle(port, threads):
    import bottle
    app = bottle.Bottle()

    @app.route("/")
    def index():
        bottle.response.content_type = "text/plain"
        return HELLO_STR

    bottle.run(app, server="wsgiref", host=HOST, port=port, quiet=True)


def serve_cherrypy(port, threads):
    import cherrypy

    class CPRoot:
        @cherrypy.expose
        def index(self):
            return HELLO_STR

    cherrypy.config.update({
        "environment": "production",
        "log.screen": False,
        "log.access_file": "",
        "log.error_file": "",
        "server.socket_host": HOST,
        "server.socket_port": port,
        "server.thread_pool": threads,
        "engine.autoreload.on": False,
    })
    cherrypy.quickstart(CPRoot(), "/", {"/": {}})


def serve_wsgiref(port, threads):
    """Standard library wsgiref, bare (single thread, HTTP/1.0)."""
    from wsgiref.simple_server import make_server, WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_request(self, *a, **kw):
            pass

    make_server(HOST, port, hello_wsgi, handler_class=Quiet).serve_forever()


LAUNCHERS = {
    "cheroot": serve_cheroot,
    "waitress": serve_waitress,
    "bottle": serve_bottle,
    "cherrypy": serve_cherrypy,
    "wsgiref": serve_wsgiref,
}


def main(argv):
    if len(argv) < 2 or argv[0] not in LAUNCHERS:
        sys.exit("usage: python -m bench.apps {%s} PORT [THREADS]"
                 % ",".join(sorted(LAUNCHERS)))
    port = int(argv[1])
    threads = int(argv[2]) if len(argv) > 2 else 10
    LAUNCHERS[argv[0]](port, threads)


if __name__ == "__main__":
    main(sys.argv[1:])
