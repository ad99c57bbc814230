"""minipub's HTTP server alone, serving a bare PEP 3333 app.

usage: python bench/serve_minipub_wsgi.py PORT [THREADS]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minipub  # noqa: E402

HELLO = b"Hello, world!"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(HELLO)))])
    return [HELLO]


def main():
    port = int(sys.argv[1])
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    minipub.Server(app, "127.0.0.1", port, thread_pool=threads).serve_forever()


if __name__ == "__main__":
    main()
