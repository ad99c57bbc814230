"""The smallest minipub application.

Run it from the repository root, then open http://127.0.0.1:8080/ ::

    python minipub.py examples.hello:Root

``python -m examples.hello`` (also from the repository root) does the same.
"""

import minipub


class Root:
    @minipub.expose
    def index(self):
        # GET / -- a returned str is sent as text/html; charset=utf-8.
        return "Hello, world!"

    @minipub.expose
    def project(self, id, *args, **kwargs):
        # GET /project/42 calls project("42"). Further path segments land in
        # args and query-string parameters in kwargs; both are ignored here.
        return "Details for project %s" % id


if __name__ == "__main__":
    minipub.quickstart(Root())
