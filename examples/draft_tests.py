"""Draft tests for the example applications (hello, faq, library).

They drive ``minipub.Application`` directly as a WSGI callable, without a
socket. Run from the repository root::

    python -m pytest examples/draft_tests.py -q
"""

import html
import io
import json
from urllib.parse import urlencode, urlsplit
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest

import minipub
from examples import faq, hello, library

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
HTML = "text/html; charset=utf-8"


def call(app, method, path, query="", body=b"", headers=None):
    """Send one request to a WSGI app.

    Returns (status code, headers with lower-cased names, body bytes).
    A query may also be given inline in ``path`` ("/x?a=1").
    """
    if "?" in path and not query:
        path, query = path.split("?", 1)
    environ = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        # PEP 3333: PATH_INFO carries the raw bytes decoded as latin-1.
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": query,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        environ[key] = value
    setup_testing_defaults(environ)

    captured = {}
    written = []

    def start_response(status, response_headers, exc_info=None):
        captured["status"] = status
        captured["headers"] = response_headers
        return written.append

    result = app(environ, start_response)
    try:
        for chunk in result:
            written.append(chunk)
    finally:
        if hasattr(result, "close"):
            result.close()
    merged = {}
    for name, value in captured["headers"]:
        name = name.lower()
        merged[name] = merged[name] + ", " + value if name in merged else value
    return int(captured["status"].split()[0]), merged, b"".join(written)


def post_form(app, path, fields):
    """POST ``fields`` (a dict or list of pairs) form-urlencoded."""
    return call(app, "POST", path, body=urlencode(fields).encode(), headers=FORM)


def location_path(headers):
    """The path of a Location header, whether it is absolute or not."""
    return urlsplit(headers["location"]).path


# --------------------------------------------------------------------- hello

@pytest.fixture
def hello_app():
    return minipub.Application(hello.Root())


def test_hello_index(hello_app):
    status, headers, body = call(hello_app, "GET", "/")
    assert status == 200
    assert body == b"Hello, world!"
    assert headers["content-type"] == HTML


def test_hello_project(hello_app):
    assert call(hello_app, "GET", "/project/42")[::2] == (
        200, b"Details for project 42")


def test_hello_project_ignores_extra_path_and_query(hello_app):
    assert call(hello_app, "GET", "/project/42/7", "x=1")[::2] == (
        200, b"Details for project 42")


def test_hello_project_without_id_is_404(hello_app):
    assert call(hello_app, "GET", "/project")[0] == 404


def test_hello_unknown_path_is_404(hello_app):
    assert call(hello_app, "GET", "/missing")[0] == 404


def test_hello_passes_wsgi_validator():
    app = validator(minipub.Application(hello.Root()))
    status, _, body = call(app, "GET", "/")
    assert (status, body) == (200, b"Hello, world!")


# ----------------------------------------------------------------------- faq

@pytest.fixture
def faq_app():
    return minipub.Application(faq.Root())


def get(app, path, query=""):
    status, _, body = call(app, "GET", path, query)
    return status, body


def test_faq_index(faq_app):
    assert get(faq_app, "/") == (200, b"minipub FAQ examples")


def test_faq_extra_path_elements_become_positional_args(faq_app):
    assert get(faq_app, "/project/123/456/789", "x=blah") == (
        200, b"Project 123; extra path: 456/789; options: x=blah")


def test_faq_project_with_id_only(faq_app):
    assert get(faq_app, "/project/123") == (
        200, b"Project 123; extra path: ; options: ")


def test_faq_project_missing_id_is_404(faq_app):
    assert get(faq_app, "/project")[0] == 404


def test_faq_dot_in_segment_maps_to_underscore(faq_app):
    status, headers, body = call(faq_app, "GET", "/report.xml")
    assert status == 200
    assert body == b"<report><status>ok</status></report>"
    assert headers["content-type"].startswith("application/xml")


def test_faq_extra_positional_arg_is_404(faq_app):
    assert get(faq_app, "/report.xml/extra")[0] == 404


def test_faq_default_catches_paths_below_its_node(faq_app):
    assert get(faq_app, "/wiki/Some/Page") == (200, b"Wiki page: Some/Page")
    assert get(faq_app, "/wiki/Single") == (200, b"Wiki page: Single")


def test_faq_index_beats_default(faq_app):
    assert get(faq_app, "/wiki/") == (200, b"Wiki front page")


def test_faq_default_does_not_cover_other_nodes(faq_app):
    assert get(faq_app, "/nowhere")[0] == 404


def test_faq_reserved_name_print(faq_app):
    assert get(faq_app, "/print") == (200, b"Printer-friendly page")


def test_faq_reserved_name_class_exposed_by_attribute(faq_app):
    assert get(faq_app, "/class/7b") == (200, b"Class 7b")
    assert get(faq_app, "/class")[0] == 404


def test_faq_reserved_name_return(faq_app):
    assert get(faq_app, "/return", "item=book") == (200, b"Returned: book")
    assert get(faq_app, "/return") == (200, b"Returned: nothing")


def test_faq_sub_node_index(faq_app):
    assert get(faq_app, "/sub/") == (200, b"Sub-node index")
    assert get(faq_app, "/sub/page") == (200, b"A page below the sub-node")


def test_faq_sub_node_without_slash_redirects(faq_app):
    status, headers, _ = call(faq_app, "GET", "/sub")
    # A permanent redirect, as CherryPy does for a missing trailing slash.
    assert status == 301
    assert location_path(headers) == "/sub/"


def test_faq_method_dispatch(faq_app):
    status, headers, body = call(faq_app, "GET", "/items")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == []

    status, _, body = post_form(faq_app, "/items", {"name": "pencil"})
    assert (status, json.loads(body)) == (201, {"id": 0, "name": "pencil"})
    post_form(faq_app, "/items", {"name": "eraser"})

    status, _, body = call(faq_app, "GET", "/items")
    assert json.loads(body) == [{"id": 0, "name": "pencil"},
                                {"id": 1, "name": "eraser"}]
    status, _, body = call(faq_app, "GET", "/items/1")
    assert (status, json.loads(body)) == (200, {"id": 1, "name": "eraser"})
    assert call(faq_app, "GET", "/items/5")[0] == 404


def test_faq_method_dispatch_unknown_method_is_405(faq_app):
    status, headers, _ = call(faq_app, "DELETE", "/items")
    assert status == 405
    # RFC 9110 requires a 405 to list what is allowed.
    assert {"GET", "POST"} <= {m.strip() for m in headers["allow"].split(",")}
    assert call(faq_app, "PUT", "/items", body=b"name=x", headers=FORM)[0] == 405


def test_faq_repeated_query_name_becomes_list(faq_app):
    assert get(faq_app, "/search", "q=cats&tag=a&tag=b") == (
        200, b"q=cats; tags=a,b; page=1")


def test_faq_single_query_name_stays_string(faq_app):
    assert get(faq_app, "/search", "tag=solo&page=3") == (
        200, b"q=; tags=solo; page=3")


def test_faq_form_body_becomes_keyword_args(faq_app):
    fields = [("q", "dogs"), ("tag", "x"), ("tag", "y"), ("page", "2")]
    assert post_form(faq_app, "/search", fields)[::2] == (
        200, b"q=dogs; tags=x,y; page=2")


def test_faq_dict_is_returned_as_json(faq_app):
    status, headers, body = call(faq_app, "GET", "/status")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == {
        "status": "ok", "handlers": ["project", "report.xml", "search"]}


# ------------------------------------------------------------------- library

SEEDED = [
    {"id": 1, "title": "Pride and Prejudice", "author": "Jane Austen",
     "year": 1813},
    {"id": 2, "title": "Frankenstein", "author": "Mary Shelley", "year": 1818},
    {"id": 3, "title": "Moby-Dick", "author": "Herman Melville", "year": 1851},
]
XSS = "<script>alert('x')</script>"


@pytest.fixture
def lib(monkeypatch):
    monkeypatch.delenv("LIBRARY_DB", raising=False)
    return minipub.Application(library.Root())


def api(app, path):
    status, headers, body = call(app, "GET", path)
    assert headers["content-type"].startswith("application/json")
    return status, json.loads(body)


def test_library_root_redirects_to_book_list(lib):
    status, headers, _ = call(lib, "GET", "/")
    assert status == 303
    assert location_path(headers) == "/books/"


def test_library_lists_seeded_books(lib):
    status, headers, body = call(lib, "GET", "/books/")
    assert status == 200
    assert headers["content-type"] == HTML
    assert b"<h1>All books</h1>" in body
    for book in SEEDED:
        assert ('<a href="/books/%d">%s</a> by %s' % (
            book["id"], book["title"], book["author"])).encode() in body


def test_library_search_by_author_case_insensitive(lib):
    status, _, body = call(lib, "GET", "/books/", "q=AUSTEN")
    assert status == 200
    assert b"Pride and Prejudice" in body
    assert b"Moby-Dick" not in body and b"Frankenstein" not in body
    assert b'value="AUSTEN"' in body


def test_library_search_by_title(lib):
    body = call(lib, "GET", "/books/", "q=moby")[2]
    assert b"Moby-Dick" in body
    assert b"Pride and Prejudice" not in body


def test_library_search_without_match(lib):
    body = call(lib, "GET", "/books/", "q=nothing+like+this")[2]
    assert b"<p>No books found.</p>" in body


def test_library_search_treats_percent_literally(lib):
    body = call(lib, "GET", "/books/", "q=%25")[2]
    assert b"<p>No books found.</p>" in body


def test_library_book_page(lib):
    status, _, body = call(lib, "GET", "/books/2")
    assert status == 200
    assert b"<h1>Frankenstein</h1>" in body
    assert b"<p>by Mary Shelley, 1818</p>" in body
    assert b'href="/books/2/edit"' in body


@pytest.mark.parametrize("path", [
    "/books/99", "/books/abc", "/books/99/edit", "/books/1/bogus",
    "/api/books/99", "/api/books/abc", "/api/books/1/2",
])
def test_library_missing_is_404(lib, path):
    assert call(lib, "GET", path)[0] == 404


def test_library_add_form(lib):
    status, _, body = call(lib, "GET", "/books/new")
    assert status == 200
    assert b'<form action="/books/new" method="post">' in body
    assert b'<input name="title" value="">' in body


def test_library_add_book(lib):
    status, headers, body = post_form(lib, "/books/new", {
        "title": "Dracula", "author": "Bram Stoker", "year": "1897"})
    assert status == 303
    assert location_path(headers) == "/books/4"
    body = call(lib, "GET", "/books/4")[2]
    assert b"<h1>Dracula</h1>" in body
    assert b"<p>by Bram Stoker, 1897</p>" in body
    assert api(lib, "/api/books/4") == (200, {
        "id": 4, "title": "Dracula", "author": "Bram Stoker", "year": 1897})
    assert b"Dracula" in call(lib, "GET", "/books/", "q=stoker")[2]


def test_library_add_book_without_year(lib):
    status, headers, _ = post_form(lib, "/books/new", {
        "title": "Beowulf", "author": "Anonymous", "year": ""})
    assert (status, location_path(headers)) == (303, "/books/4")
    assert api(lib, "/api/books/4")[1]["year"] is None
    assert b"<p>by Anonymous, year unknown</p>" in call(lib, "GET", "/books/4")[2]


def test_library_add_uses_first_of_repeated_field(lib):
    post_form(lib, "/books/new", [("title", "First"), ("title", "Second"),
                                  ("author", "A. N. Author")])
    assert api(lib, "/api/books/4")[1]["title"] == "First"


@pytest.mark.parametrize("fields, message", [
    ({"title": "", "author": "Someone"}, b"Title and author are required."),
    ({"title": "Something", "author": "  "}, b"Title and author are required."),
    ({"title": "T", "author": "A", "year": "19x"}, b"Year must be a whole number."),
])
def test_library_add_rejects_invalid_input(lib, fields, message):
    status, _, body = post_form(lib, "/books/new", fields)
    assert status == 400
    assert b'<p class="error">' + message + b"</p>" in body
    assert len(api(lib, "/api/books")[1]) == 3


def test_library_add_rejects_other_methods(lib):
    assert call(lib, "DELETE", "/books/new")[0] == 405


def test_library_edit_form_is_prefilled(lib):
    status, _, body = call(lib, "GET", "/books/1/edit")
    assert status == 200
    assert b"<h1>Edit Pride and Prejudice</h1>" in body
    assert b'<form action="/books/1/edit" method="post">' in body
    assert b'<input name="title" value="Pride and Prejudice">' in body
    assert b'<input name="author" value="Jane Austen">' in body
    assert b'<input name="year" value="1813">' in body


def test_library_edit_book(lib):
    status, headers, _ = post_form(lib, "/books/1/edit", {
        "title": "Emma", "author": "Jane Austen", "year": "1815"})
    assert (status, location_path(headers)) == (303, "/books/1")
    assert api(lib, "/api/books/1") == (200, {
        "id": 1, "title": "Emma", "author": "Jane Austen", "year": 1815})
    assert len(api(lib, "/api/books")[1]) == 3


def test_library_edit_rejects_invalid_input(lib):
    status, _, body = post_form(lib, "/books/1/edit", {
        "title": "", "author": "Jane Austen"})
    assert status == 400
    assert b"Title and author are required." in body
    assert api(lib, "/api/books/1")[1] == SEEDED[0]


def test_library_api_lists_books(lib):
    assert api(lib, "/api/books") == (200, SEEDED)


def test_library_api_one_book(lib):
    assert api(lib, "/api/books/2") == (200, SEEDED[1])


def test_library_escapes_script_title(lib):
    status, headers, _ = post_form(lib, "/books/new", {
        "title": XSS, "author": 'Eve "quote" <b>', "year": ""})
    assert (status, location_path(headers)) == (303, "/books/4")
    escaped = html.escape(XSS).encode()
    assert escaped == b"&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    pages = [call(lib, "GET", "/books/4")[2],
             call(lib, "GET", "/books/")[2],
             call(lib, "GET", "/books/", "q=script")[2],
             call(lib, "GET", "/books/4/edit")[2]]
    for body in pages:
        assert b"<script>" not in body and b"<b>" not in body
        assert escaped in body
    assert b'value="Eve &quot;quote&quot; &lt;b&gt;"' in pages[3]
    # JSON carries the raw text; escaping is the HTML view's business.
    assert api(lib, "/api/books/4")[1]["title"] == XSS


def test_library_escapes_search_query_and_invalid_form(lib):
    body = call(lib, "GET", "/books/", "q=" + urlencode({"": XSS})[1:])[2]
    assert b"<script>" not in body
    assert b'value="' + html.escape(XSS).encode() + b'"' in body
    status, _, body = post_form(lib, "/books/new", {"title": XSS, "author": ""})
    assert status == 400
    assert b"<script>" not in body
    assert b'value="' + html.escape(XSS).encode() + b'"' in body


def test_library_database_file_persists_and_seeds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LIBRARY_DB", str(tmp_path / "books.sqlite3"))
    first = minipub.Application(library.Root())
    post_form(first, "/books/new", {"title": "Kept", "author": "Someone"})
    second = minipub.Application(library.Root())
    books = api(second, "/api/books")[1]
    assert [book["title"] for book in books] == [
        "Pride and Prejudice", "Frankenstein", "Moby-Dick", "Kept"]
