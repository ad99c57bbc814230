"""Answers to the usual "how do I map this URL?" questions, as runnable code.

Each section below is one question about URL dispatch, answered by a handler
you can try in a browser or with curl. Run it from the repository root::

    python minipub.py examples.faq:Root

and then, for example::

    curl 'http://127.0.0.1:8080/project/123/456/789?x=blah'
    curl http://127.0.0.1:8080/report.xml
    curl http://127.0.0.1:8080/wiki/Some/Page
    curl http://127.0.0.1:8080/print
    curl -i http://127.0.0.1:8080/sub
    curl -X POST -d name=pencil http://127.0.0.1:8080/items
    curl 'http://127.0.0.1:8080/search?q=cats&tag=a&tag=b'
    curl http://127.0.0.1:8080/status

``python -m examples.faq`` (from the repository root) starts it as well.
"""

import threading

import minipub


# Q: How do I serve a page with sub-pages, such as /sub/ and /sub/page?
# A: Attach an object as an attribute. Its ``index`` answers the node itself
#    (/sub/); a request for /sub, without the trailing slash, is redirected to
#    /sub/ so that relative links inside that page resolve below the node.
class Sub:
    @minipub.expose
    def index(self):
        return "Sub-node index"

    @minipub.expose
    def page(self):
        return "A page below the sub-node"


# Q: How do I catch every path under a node, for instance a wiki?
# A: Give the node a ``default`` handler. Whatever path segments do not match
#    an attribute arrive as positional arguments. It only covers paths below
#    its own node: the root in this module has no ``default``, so /nowhere is
#    still a 404.
class Wiki:
    @minipub.expose
    def index(self):
        return "Wiki front page"

    @minipub.expose
    def default(self, *args, **kwargs):
        return "Wiki page: %s" % "/".join(args)


# Q: How do I dispatch on the HTTP method instead of on the path?
# A: Expose the class itself and give it upper-case methods named after the
#    HTTP verbs. A request whose method has no handler gets 405.
@minipub.expose
class Items:
    def __init__(self):
        # One instance serves every request thread, so guard the shared list.
        self._lock = threading.Lock()
        self._names = []

    def GET(self, id=None):
        # GET /items lists everything; GET /items/0 fetches one entry.
        with self._lock:
            if id is None:
                return [{"id": i, "name": n} for i, n in enumerate(self._names)]
            if not id.isdecimal() or int(id) >= len(self._names):
                raise minipub.NotFound("No item %s" % id)
            return {"id": int(id), "name": self._names[int(id)]}

    def POST(self, name):
        with self._lock:
            self._names.append(name)
            item = {"id": len(self._names) - 1, "name": name}
        minipub.response.status = 201
        return item


class Root:
    def __init__(self):
        self.sub = Sub()
        self.wiki = Wiki()
        self.items = Items()
        # Q: How do I publish a URL whose name is a Python keyword, like
        #    /print, /class or /return?
        # A: A method cannot be written with that name, so define it under
        #    another one and bind it with setattr. The handler must still be
        #    exposed, either with the decorator or with ``.exposed = True``.
        setattr(self, "print", self._print)
        setattr(self, "class", self._class)
        setattr(self, "return", self._return)

    # Every URL this module demonstrates, linked from the index page. The
    # links are relative, so they work wherever the tree is mounted.
    EXAMPLES = ("project/123/456/789?x=blah", "report.xml", "wiki/", "wiki/Some/Page", "print", "class/7b",
                "return?item=book", "sub", "sub/page", "items", "items/0", "search?q=cats&tag=a&tag=b", "status")

    @minipub.expose
    def index(self):
        from html import escape
        links = "".join('<li><a href="%s">/%s</a></li>\n' % (escape(url), escape(url)) for url in self.EXAMPLES)
        return ("<!DOCTYPE html>\n<title>minipub FAQ examples</title>\n<h1>minipub FAQ examples</h1>\n"
                "<ul>\n%s</ul>\n<form method=\"post\" action=\"items\"><input name=\"name\" value=\"pencil\"> "
                "<button>POST /items</button></form>\n" % links)

    # Q: How do I accept extra path elements, as in /project/123/456/789?
    # A: Path segments after the handler's own name become positional
    #    arguments; query parameters become keyword arguments. So
    #    /project/123/456/789?x=blah calls project("123", "456", "789", x="blah").
    #    A request with no id at all (/project) is a 404, and so is one with
    #    extra segments for a handler that takes no *args.
    @minipub.expose
    def project(self, id, *args, **kwargs):
        options = ", ".join("%s=%s" % item for item in sorted(kwargs.items()))
        return "Project %s; extra path: %s; options: %s" % (
            id, "/".join(args), options)

    # Q: How do I answer /report.xml when a dot cannot appear in a name?
    # A: Punctuation in a path segment is looked up as an underscore, so
    #    /report.xml reaches report_xml. Set the Content-Type yourself.
    @minipub.expose
    def report_xml(self):
        minipub.response.headers["Content-Type"] = "application/xml"
        return "<report><status>ok</status></report>"

    # The keyword-named handlers bound in __init__. Both ways of exposing a
    # handler are shown.
    @minipub.expose
    def _print(self):
        return "Printer-friendly page"

    def _class(self, name):
        return "Class %s" % name
    _class.exposed = True

    @minipub.expose
    def _return(self, item="nothing"):
        return "Returned: %s" % item

    # Q: How do I read query-string or form parameters, including a name that
    #    appears more than once?
    # A: They arrive as keyword arguments, whether they come from the query
    #    string or from a form-encoded POST body. A name given several times
    #    becomes a list; given once, it is a plain string.
    @minipub.expose
    def search(self, q="", tag=None, page="1"):
        if tag is None:
            tags = []
        elif isinstance(tag, list):
            tags = tag
        else:
            tags = [tag]
        return "q=%s; tags=%s; page=%s" % (q, ",".join(tags), page)

    # Q: How do I return JSON?
    # A: Return a dict (or a list); it is serialised with Content-Type
    #    application/json.
    @minipub.expose
    def status(self):
        return {"status": "ok", "handlers": ["project", "report.xml", "search"]}


if __name__ == "__main__":
    minipub.quickstart(Root())
