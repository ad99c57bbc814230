"""minipub full stack without the CLI (fallback when `python minipub.py
bench.apps:Root ...` is unavailable): Application(Root()) on minipub.Server.

usage: python bench/serve_minipub_app.py PORT [THREADS]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minipub  # noqa: E402


class Root:
    @minipub.expose
    def index(self):
        return "Hello, world!"


def main():
    port = int(sys.argv[1])
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    app = minipub.Application(Root(), config={"log.screen": False})
    minipub.Server(app, "127.0.0.1", port, thread_pool=threads).serve_forever()


if __name__ == "__main__":
    main()
