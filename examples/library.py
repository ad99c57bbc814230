"""A small book catalogue on sqlite3: list, search, add, edit, and a JSON API.

Run it from the repository root, then open http://127.0.0.1:8080/ ::

    python minipub.py examples.library:Root

The catalogue lives in memory and is lost on exit unless LIBRARY_DB names a
database file, e.g. ``LIBRARY_DB=books.sqlite3 python minipub.py ...``.
Three books are added the first time a database is used.

    /books/             list, or search with ?q=... (title or author)
    /books/new          form to add a book (GET), create it (POST)
    /books/ID           one book
    /books/ID/edit      form to edit a book (GET), save it (POST)
    /api/books          every book as JSON
    /api/books/ID       one book as JSON
"""

import html
import os
import sqlite3
import threading
from string import Template

import minipub

SEED = [
    ("Pride and Prejudice", "Jane Austen", 1813),
    ("Frankenstein", "Mary Shelley", 1818),
    ("Moby-Dick", "Herman Melville", 1851),
]

PAGE = Template("""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>$title</title></head>
<body>
<p><a href="/books/">All books</a> | <a href="/books/new">Add a book</a></p>
<h1>$title</h1>
$content
</body></html>
""")

LIST = Template("""<form action="/books/" method="get">
<input name="q" value="$q"> <button>Search</button>
</form>
$rows""")

ROW = Template('<li><a href="/books/$id">$title</a> by $author</li>')

DETAIL = Template("""<p>by $author, $year</p>
<p><a href="/books/$id/edit">Edit</a></p>""")

FORM = Template("""$error<form action="$action" method="post">
<p><label>Title <input name="title" value="$title"></label></p>
<p><label>Author <input name="author" value="$author"></label></p>
<p><label>Year <input name="year" value="$year"></label></p>
<p><button>Save</button></p>
</form>""")


def page(title, content):
    """Wrap already-escaped content in the site layout."""
    return PAGE.substitute(title=html.escape(title), content=content)


def field(form, name):
    """One stripped form value; a repeated field keeps its first value."""
    value = form.get(name, "")
    if isinstance(value, list):
        value = value[0] if value else ""
    return value.strip()


class Catalogue:
    """The books table behind one shared connection, serialised by a lock."""

    def __init__(self, path):
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.lock = threading.Lock()
        with self.lock, self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS books (id INTEGER"
                            " PRIMARY KEY, title TEXT NOT NULL,"
                            " author TEXT NOT NULL, year INTEGER)")
            if not self.db.execute("SELECT 1 FROM books LIMIT 1").fetchone():
                self.db.executemany("INSERT INTO books (title, author, year)"
                                    " VALUES (?, ?, ?)", SEED)

    def _query(self, sql, args=()):
        with self.lock:
            return [dict(row) for row in self.db.execute(sql, args)]

    def all(self):
        return self._query("SELECT * FROM books ORDER BY id")

    def search(self, q=""):
        # Escape LIKE wildcards so that a search for "50%" means what it says.
        pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%") \
                         .replace("_", "\\_") + "%"
        return self._query("SELECT * FROM books WHERE title LIKE ? ESCAPE '\\'"
                           " OR author LIKE ? ESCAPE '\\' ORDER BY title",
                           (pattern, pattern))

    def get(self, book_id):
        if not book_id.isdecimal():
            raise minipub.NotFound("No book %s" % book_id)
        rows = self._query("SELECT * FROM books WHERE id = ?", (int(book_id),))
        if not rows:
            raise minipub.NotFound("No book %s" % book_id)
        return rows[0]

    def save(self, book, book_id=None):
        args = (book["title"], book["author"], book["year"])
        with self.lock, self.db:
            if book_id is None:
                return self.db.execute("INSERT INTO books (title, author, year)"
                                       " VALUES (?, ?, ?)", args).lastrowid
            self.db.execute("UPDATE books SET title = ?, author = ?, year = ?"
                            " WHERE id = ?", args + (book_id,))
            return book_id


def edit_form(catalogue, heading, action, form, book_id=None):
    """GET shows the form; a valid POST saves and redirects to the book."""
    method = minipub.request.method
    if method not in ("GET", "HEAD", "POST"):
        raise minipub.HTTPError(405, "Use GET or POST")
    book = {name: field(form, name) for name in ("title", "author", "year")}
    error = ""
    if method == "POST":
        if not book["title"] or not book["author"]:
            error = "Title and author are required."
        elif book["year"] and not (book["year"].isascii()
                                   and book["year"].isdigit()):
            error = "Year must be a whole number."
        else:
            book["year"] = int(book["year"]) if book["year"] else None
            new_id = catalogue.save(book, book_id)
            raise minipub.HTTPRedirect("/books/%d" % new_id)
        minipub.response.status = 400
    values = {name: html.escape(str(value)) for name, value in book.items()}
    error = error and '<p class="error">%s</p>\n' % html.escape(error)
    return page(heading, FORM.substitute(values, error=error,
                                         action=html.escape(action)))


class Books:
    def __init__(self, catalogue):
        self.catalogue = catalogue

    @minipub.expose
    def index(self, **params):
        q = field(params, "q")
        books = self.catalogue.search(q)
        rows = "\n".join(ROW.substitute({k: html.escape(str(v))
                                         for k, v in book.items()})
                         for book in books)
        rows = "<ul>\n%s\n</ul>" % rows if rows else "<p>No books found.</p>"
        title = 'Books matching "%s"' % q if q else "All books"
        return page(title, LIST.substitute(q=html.escape(q), rows=rows))

    @minipub.expose
    def new(self, **form):
        return edit_form(self.catalogue, "Add a book", "/books/new", form)

    @minipub.expose
    def default(self, book_id, action=None, **form):
        # /books/ID shows a book; /books/ID/edit edits it.
        book = self.catalogue.get(book_id)
        if action == "edit":
            if minipub.request.method != "POST":
                form = {k: "" if v is None else str(v) for k, v in book.items()}
            return edit_form(self.catalogue, "Edit %s" % book["title"],
                             "/books/%d/edit" % book["id"], form, book["id"])
        if action is not None:
            raise minipub.NotFound("No such page")
        year = "year unknown" if book["year"] is None else book["year"]
        return page(book["title"], DETAIL.substitute(
            id=book["id"], author=html.escape(book["author"]), year=year))


class Api:
    def __init__(self, catalogue):
        self.catalogue = catalogue

    @minipub.expose
    def books(self, book_id=None, **ignored):
        if book_id is None:
            return self.catalogue.all()
        return self.catalogue.get(book_id)


class Root:
    def __init__(self):
        catalogue = Catalogue(os.environ.get("LIBRARY_DB", ":memory:"))
        self.books = Books(catalogue)
        self.api = Api(catalogue)

    @minipub.expose
    def index(self):
        raise minipub.HTTPRedirect("/books/")


if __name__ == "__main__":
    minipub.quickstart(Root())
