"""A CherryPy-style application: a config file with path sections, static files,
JSON tools and a custom error page.  Written as a CherryPy program is; with
``import cherrypy`` in place of ``import minipub`` the same code runs on CherryPy.

Run it from the repository root, then open http://127.0.0.1:8080/ ::

    python -m examples.notes                     # quickstart(), as CherryPy programs do
    python minipub.py examples.notes:app         # or the mounted application, from the CLI

The API: ``GET /api/notes`` lists the notes, ``POST /api/notes`` with a JSON
body ``{"text": "..."}`` adds one, ``GET /api/notes/1`` returns one.
"""
import os
import threading

import minipub

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(HERE, "notes.conf")  # [/], [/static] and [/api] sections


class Notes:
    """/api/notes: a resource answering through GET and POST; JSON in and out (json_out is on for
    /api in notes.conf, json_in on POST by decorator)."""

    exposed = True

    def __init__(self):
        self.items, self.lock = [], threading.Lock()

    def GET(self, number=None):
        if number is None:
            return {"notes": self.items}
        if not number.isdigit() or not 1 <= int(number) <= len(self.items):
            raise minipub.NotFound("There is no note %s." % number)
        return self.items[int(number) - 1]

    @minipub.tools.json_in()
    def POST(self):
        note = minipub.request.json
        if not isinstance(note, dict) or not isinstance(note.get("text"), str) or not note["text"].strip():
            raise minipub.HTTPError(400, 'Send {"text": "..."}.')
        with self.lock:
            self.items.append({"id": len(self.items) + 1, "text": note["text"].strip()})
            minipub.response.status = 201
            return self.items[-1]


class Api:
    def __init__(self):
        self.notes = Notes()


class Root:
    _cp_config = {"error_page.404": os.path.join(HERE, "notes_404.html")}  # config on the object itself

    def __init__(self):
        self.api = Api()

    @minipub.expose
    def index(self):
        return ('<!DOCTYPE html><html><head><link rel="stylesheet" href="/static/style.css">'
                '<title>Notes</title></head><body><h1>Notes</h1>'
                '<p><a href="/api/notes">/api/notes</a> lists them as JSON; '
                '<a href="/nowhere">a broken link</a> shows the custom 404 page.</p></body></html>')


# staticdir.dir in notes.conf is relative; CherryPy resolves it against tools.staticdir.root.
minipub.config.update({"tools.staticdir.root": HERE})
app = minipub.tree.mount(Root(), "/", CONF)

if __name__ == "__main__":
    minipub.quickstart(config=CONF)
