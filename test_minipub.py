"""Tests for minipub, in the same sections as the module.

Unit tests call the parser and the WSGI application directly; integration
tests start a real minipub.Server on port 0 and talk to it over sockets.
Every test is bounded in time; none sleeps a fixed time.
"""
import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import wsgiref.util
import wsgiref.validate

import pytest

import minipub

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# helpers shared by every section
# ---------------------------------------------------------------------------

@pytest.fixture
def serve():
    """serve(app, **options) -> a started Server on a free port; stopped after the test."""
    servers = []

    def start(app, **options):
        server = minipub.Server(app, "127.0.0.1", 0, **options).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop(10)


def hello_app(environ, start_response):
    body = b"hello " + environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


def exchange(port, data, timeout=5.0, until_close=True):
    """Send raw bytes; return everything received until the peer closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not until_close and b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def responses(raw):
    """Split raw bytes into [(status, headers dict lower-case, body)] (Content-Length/chunked)."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, raw = raw[:n], raw[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body, raw = body + raw[:size], raw[size + 2:]
                if size == 0:
                    break
        else:
            body, raw = raw, b""
        out.append((status, headers, body))
    return out


def call_app(app, method="GET", path="/", query="", body=b"", headers=None):
    """Call a WSGI app without a socket, through wsgiref.validate; (status, headers, body)."""
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
               "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
    wsgiref.util.setup_testing_defaults(environ)
    captured = {}

    def start_response(status, fields, exc_info=None):
        captured["status"], captured["headers"] = status, fields
    result = wsgiref.validate.validator(app)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    return int(captured["status"][:3]), {k.lower(): v for k, v in captured["headers"]}, data


# ===========================================================================
# Configuration and limits
# ===========================================================================


# ===========================================================================
# Server: accept, poll, workers
# ===========================================================================


# ===========================================================================
# HTTP/1.1 parser
# ===========================================================================


# ===========================================================================
# WSGI bridge
# ===========================================================================


# ===========================================================================
# Application and dispatch
# ===========================================================================


# -- virtual hosts and proxies -------------------------------------------------


# ===========================================================================
# Tools: authentication
# ===========================================================================


# ===========================================================================
# Tools: static files
# ===========================================================================

import hashlib  # noqa: E402  (used by the static and upload sections)
import json  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402


def _png(width, height, rgb):
    """A solid-colour PNG, built with zlib (no imaging library needed)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _png_pixels(data):
    """(width, height, set of (r, g, b)) of an 8-bit RGB/RGBA PNG, unfiltered in pure Python."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, prev, colours = zlib.decompress(idat), width * bpp, bytearray(width * bpp), set()
    for y in range(height):
        kind, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a, b = row[i - bpp] if i >= bpp else 0, prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                row[i] = (row[i] + a) & 255
            elif kind == 2:
                row[i] = (row[i] + b) & 255
            elif kind == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        colours.update(tuple(row[x:x + 3]) for x in range(0, stride, bpp))
        prev = row
    return width, height, colours


@pytest.fixture
def site(tmp_path):
    """A static directory, its sibling 'static-secret', a file outside and symlinks."""
    root = tmp_path / "static"
    (root / "css").mkdir(parents=True)
    (root / "js").mkdir()
    (root / "img").mkdir()
    (root / "empty").mkdir()
    (root / "index.html").write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" href="css/site.css?v=1">'
        '<script src="js/app.js" defer></script></head>'
        '<body><img src="img/dot.png" width="40" height="40"><div id="box"></div></body></html>')
    (root / "css" / "site.css").write_text(
        "html, body { background: #1e90ff; margin: 0; }\n#box { width: 200px; height: 100px; }\n")
    (root / "js" / "app.js").write_text('document.getElementById("box").style.background = "#ff8c00";\n')
    (root / "img" / "dot.png").write_bytes(_png(4, 4, (0, 200, 0)))
    (root / "noext").write_text("<script>alert(1)</script>")
    (root / "data.zzqq").write_bytes(bytes(range(256)) * 4)
    (root / "héllo wörld.txt").write_text("unicode name")
    (tmp_path / "static-secret").mkdir()
    (tmp_path / "static-secret" / "secret.txt").write_text("TOP-SECRET")
    (tmp_path / "outside.txt").write_text("TOP-SECRET outside")
    os.symlink(str(tmp_path / "outside.txt"), str(root / "link_out.txt"))
    os.symlink("css/site.css", str(root / "link_in.css"))
    return tmp_path


def static_app(site, **options):
    class Root:
        static = minipub.StaticDir(str(site / "static"), **options)
        follow = minipub.StaticDir(str(site / "static"), follow_symlinks=True)
        noindex = minipub.StaticDir(str(site / "static"), index=None)

        @minipub.expose
        def download(self):
            return minipub.serve_file(str(site / "static" / "héllo wörld.txt"), disposition="attachment")
    return minipub.Application(Root())


def get(port, path, method="GET", headers=()):
    """One request on a fresh connection: (status, headers, body)."""
    head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n" % (method, path, port)
    head += "".join("%s: %s\r\n" % h for h in headers)
    raw = exchange(port, head.encode("latin-1") + b"\r\n")
    if method == "HEAD":
        head, _, rest = raw.partition(b"\r\n\r\n")
        return responses(head + b"\r\n\r\n")[0][:2] + (rest,)  # whatever follows the head
    return responses(raw)[0]


def test_static_types_nosniff_and_validators(serve, site):
    port = serve(static_app(site)).port
    expected = {"/static/index.html": "text/html; charset=utf-8",
                "/static/css/site.css": "text/css; charset=utf-8",
                "/static/js/app.js": "text/javascript; charset=utf-8",
                "/static/img/dot.png": "image/png",
                "/static/noext": "application/octet-stream",
                "/static/data.zzqq": "application/octet-stream",
                "/static/h%C3%A9llo%20w%C3%B6rld.txt": "text/plain; charset=utf-8"}
    for path, ctype in expected.items():
        status, headers, body = get(port, path)
        assert (status, headers["content-type"]) == (200, ctype), path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["accept-ranges"] == "bytes" and headers["cache-control"] == "no-cache"
        assert int(headers["content-length"]) == len(body) > 0
        assert headers["etag"].startswith('"') and headers["last-modified"].endswith(" GMT")
    status, headers, body = get(port, "/static/")
    assert status == 200 and body.startswith(b"<!DOCTYPE html>")
    status, headers, _ = get(port, "/static/css")
    assert status == 301 and headers["location"] == "http://127.0.0.1:%d/static/css/" % port
    assert get(port, "/static/css/")[0] == 404  # no index.html there, and no listing
    assert get(port, "/noindex/")[0] == 404
    assert get(port, "/static/missing.css")[0] == 404
    status, headers, _ = get(port, "/static/index.html", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = get(port, "/download")
    assert headers["content-disposition"] == (
        "attachment; filename=\"h_llo w_rld.txt\"; filename*=UTF-8''h%C3%A9llo%20w%C3%B6rld.txt")
    assert body == b"unicode name"


def test_static_conditional_requests(serve, site):
    port = serve(static_app(site)).port
    status, headers, body = get(port, "/static/css/site.css")
    etag, modified = headers["etag"], headers["last-modified"]
    cases = [
        ([("If-None-Match", etag)], 304), ([("If-None-Match", 'W/' + etag)], 304),
        ([("If-None-Match", '"other", ' + etag)], 304), ([("If-None-Match", '"other"')], 200),
        ([("If-Modified-Since", modified)], 304),
        ([("If-Modified-Since", "Thu, 01 Jan 1998 00:00:00 GMT")], 200),
        ([("If-Modified-Since", "not a date")], 200),
        ([("If-None-Match", '"other"'), ("If-Modified-Since", modified)], 200),  # INM wins
        ([("If-Match", etag)], 200), ([("If-Match", "*")], 200),
        ([("If-Match", '"other"')], 412), ([("If-Match", "W/" + etag)], 412),  # strong comparison
        ([("If-Unmodified-Since", "Thu, 01 Jan 1998 00:00:00 GMT")], 412),
        ([("If-Unmodified-Since", modified)], 200),
    ]
    for headers_sent, want in cases:
        status, headers, body = get(port, "/static/css/site.css", headers=headers_sent)
        assert status == want, headers_sent
        if want == 304:
            assert body == b"" and headers["etag"] == etag
            assert headers["content-length"] == str(os.path.getsize(site / "static/css/site.css"))


def test_static_ranges_and_head(serve, site):
    server = serve(static_app(site))
    calls = []
    real_sendfile = server.sendfile

    def spy(conn, file, offset, count):
        calls.append((offset, count))
        return real_sendfile(conn, file, offset, count)
    server.sendfile = spy
    port, data = server.port, (site / "static/data.zzqq").read_bytes()
    status, headers, body = get(port, "/static/data.zzqq", headers=[("Range", "bytes=10-19")])
    assert (status, body, headers["content-range"]) == (206, data[10:20], "bytes 10-19/1024")
    assert calls == [(10, 10)]  # zero-copy with the right offset and length
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=1000-")])[2] == data[1000:]
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=-24")])[2] == data[-24:]
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=1020-5000")])[2] == data[1020:]
    for bad in ("bytes=1024-", "bytes=2000-3000", "bytes=-0", "bytes=5-2"):
        status, headers, _ = get(port, "/static/data.zzqq", headers=[("Range", bad)])
        assert (status, headers["content-range"]) == (416, "bytes */1024"), bad
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=x-y"):
        status, _, body = get(port, "/static/data.zzqq", headers=[("Range", ignored)])
        assert (status, body) == (200, data), ignored
    etag = get(port, "/static/data.zzqq")[1]["etag"]
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=0-0"), ("If-Range", etag)])[0] == 206
    assert get(port, "/static/data.zzqq", headers=[("Range", "bytes=0-0"), ("If-Range", '"old"')])[0] == 200
    status, headers, body = get(port, "/static/data.zzqq", "HEAD")
    assert (status, headers["content-length"], body) == (200, "1024", b"")
    assert headers["content-type"] == "application/octet-stream"
    with urllib.request.urlopen("http://127.0.0.1:%d/static/data.zzqq" % port, timeout=5) as resp:
        assert resp.read() == data
    assert calls[-1] == (0, 1024)


def test_static_range_over_tls_uses_the_fallback_loop(serve, site, tmp_path):
    import ssl
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1"], capture_output=True, timeout=60, check=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    (site / "static" / "big.bin").write_bytes(os.urandom(600000))
    data = (site / "static" / "big.bin").read_bytes()
    server = minipub.Server(static_app(site), "127.0.0.1", 0, ssl_context=context).start()
    try:
        url = "https://127.0.0.1:%d/static/big.bin" % server.port
        assert curl("-k", "-r", "300000-599998", url) == data[300000:599999]
        assert curl("-k", url) == data
    finally:
        server.stop(10)


TRAVERSALS = [
    "/static/../static-secret/secret.txt",
    "/static/..%2fstatic-secret/secret.txt",
    "/static/..%2Fstatic-secret%2Fsecret.txt",
    "/static/%2e%2e/static-secret/secret.txt",
    "/static/%2e%2e%2fstatic-secret%2fsecret.txt",
    "/static/.%2e/outside.txt",
    "/static/%252e%252e%252fstatic-secret%252fsecret.txt",
    "/static/..%252fstatic-secret/secret.txt",
    "/static/..%5cstatic-secret%5csecret.txt",
    "/static/..\\static-secret\\secret.txt",
    "/static/secret.txt%00.css",
    "/static/index.html%00",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/C:%5cWindows%5cwin.ini",
    "/static/C:/Windows/win.ini",
    "/static/./../outside.txt",
    "/static/css/../../outside.txt",
    "/static/link_out.txt",
    "/static/..",
    "/static/%2e%2e",
]


def test_static_traversal_vectors_are_refused(serve, site):
    port = serve(static_app(site)).port
    for target in TRAVERSALS + ["http://127.0.0.1:%d/static/..%%2fstatic-secret/secret.txt" % port]:
        status, headers, body = get(port, target)
        assert status in (403, 404), target
        assert b"SECRET" not in body and headers["x-content-type-options"] == "nosniff"
    assert get(port, "/static/css/site.css")[0] == 200  # the same server still serves


def test_static_symlink_policy(serve, site):
    port = serve(static_app(site)).port
    assert get(port, "/static/link_out.txt")[0] == 403
    status, _, body = get(port, "/static/link_in.css")
    assert status == 200 and body.startswith(b"html, body")  # a link inside the directory is fine
    status, _, body = get(port, "/follow/link_out.txt")
    assert (status, body) == (200, b"TOP-SECRET outside")
    assert get(port, "/follow/../outside.txt")[0] == 403  # following links never allows '..'


def test_static_page_in_headless_chromium(serve, site, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    app, seen = static_app(site), []

    def counting(environ, start_response):
        def start(status, headers, exc_info=None):
            seen.append((environ["PATH_INFO"], status[:3]))
            return start_response(status, headers, exc_info)
        return app(environ, start)
    port = serve(counting).port
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--user-data-dir=%s" % (tmp_path / "profile"), "--screenshot=%s" % shot,
           "--window-size=320,240", "http://127.0.0.1:%d/static/" % port]
    subprocess.run(cmd, capture_output=True, timeout=90)
    statuses = dict(seen)
    for path in ("/static/", "/static/css/site.css", "/static/js/app.js", "/static/img/dot.png"):
        assert statuses.get(path) == "200", (path, seen)
    width, height, colours = _png_pixels(shot.read_bytes())
    assert (width, height) == (320, 240)
    assert {(30, 144, 255), (255, 140, 0), (0, 200, 0)} <= colours  # CSS, JS and image all applied


# ===========================================================================
# Tools: uploads
# ===========================================================================

def upload_app(tmp_path, config=None):
    """/up echoes what arrived (sha256 per file); /keep saves each Part under tmp_path/saved."""
    seen = []

    def describe(value):
        if isinstance(value, list):
            return [describe(v) for v in value]
        if not isinstance(value, minipub.Part):
            return value
        seen.append(value)
        return {"filename": value.filename, "safe": value.safe_filename, "type": value.content_type,
                "size": value.size, "sha256": hashlib.sha256(value.file.read()).hexdigest(),
                "on_disk": value._temp is not None}

    class Root:
        @minipub.expose
        def up(self, **params):
            return {name: describe(value) for name, value in params.items()}

        @minipub.expose
        def keep(self, **params):
            out = {}
            for name, part in params.items():
                target = str(tmp_path / "saved" / part.safe_filename)
                temp = part._temp
                part.save(target)
                out[name] = [temp, os.stat(target).st_ino]
            return out

        @minipub.expose
        def put(self):
            digest, size = hashlib.sha256(), 0
            while True:
                block = minipub.request.body.read(65536)
                if not block:
                    return {"size": size, "sha256": digest.hexdigest()}
                digest.update(block)
                size += len(block)
    app = minipub.Application(Root(), config)
    app.seen = seen
    return app


@pytest.fixture
def tmpdir_uploads(tmp_path, monkeypatch):
    """Temporary files of uploads go to a directory of their own, checked empty afterwards."""
    import tempfile
    spool = tmp_path / "spool"
    spool.mkdir()
    (tmp_path / "saved").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    return spool


def curl(*args, timeout=60):
    out = subprocess.run(["curl", "-sS", "--max-time", "50", *args], capture_output=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_upload_curl_files_and_fields(serve, tmp_path, tmpdir_uploads):
    app = upload_app(tmp_path, {"request.upload_spool_size": 64 * 1024})
    port = serve(app).port
    big, small = os.urandom(3 * 1024 * 1024 + 17), b"\r\n--not-a-boundary\r\n" * 100
    (tmp_path / "big.bin").write_bytes(big)
    (tmp_path / "small.txt").write_bytes(small)
    (tmp_path / "empty").write_bytes(b"")
    body = curl("-F", "title=Été", "-F", "tag=a", "-F", "tag=b",
                "-F", "big=@%s" % (tmp_path / "big.bin"),
                "-F", "small=@%s;type=text/plain;filename=résumé ü.txt" % (tmp_path / "small.txt"),
                "-F", "empty=@%s" % (tmp_path / "empty"),
                "http://127.0.0.1:%d/up" % port)
    got = json.loads(body)
    assert got["title"] == "Été" and got["tag"] == ["a", "b"]
    assert got["big"] == {"filename": "big.bin", "safe": "big.bin", "type": "application/octet-stream",
                          "size": len(big), "sha256": _sha(big), "on_disk": True}
    assert got["small"] == {"filename": "résumé ü.txt", "safe": "résumé ü.txt", "type": "text/plain",
                            "size": len(small), "sha256": _sha(small), "on_disk": False}
    assert got["empty"]["size"] == 0 and got["empty"]["sha256"] == _sha(b"")
    assert got["empty"]["on_disk"] is False
    assert all(part.file.closed for part in app.seen) and os.listdir(tmpdir_uploads) == []


def test_upload_curl_chunked_and_put_stream(serve, tmp_path, tmpdir_uploads):
    port = serve(upload_app(tmp_path, {"request.upload_spool_size": 1024})).port
    data = os.urandom(2 * 1024 * 1024)
    (tmp_path / "data.bin").write_bytes(data)
    got = json.loads(curl("-H", "Transfer-Encoding: chunked", "-F", "f=@%s" % (tmp_path / "data.bin"),
                          "-F", "n=1", "http://127.0.0.1:%d/up" % port))
    assert (got["f"]["size"], got["f"]["sha256"], got["n"]) == (len(data), _sha(data), "1")
    got = json.loads(curl("-T", str(tmp_path / "data.bin"), "http://127.0.0.1:%d/put" % port))
    assert got == {"size": len(data), "sha256": _sha(data)}
    assert os.listdir(tmpdir_uploads) == []


def test_upload_save_renames_and_temp_files_go(serve, tmp_path, tmpdir_uploads):
    port = serve(upload_app(tmp_path, {"request.upload_spool_size": 1024})).port
    data = os.urandom(100000)
    (tmp_path / "x.bin").write_bytes(data)
    got = json.loads(curl("-F", "a=@%s;filename=../../evil/x.bin" % (tmp_path / "x.bin"),
                          "-F", "b=@%s;filename=small.txt" % (tmp_path / "small.txt")
                          if (tmp_path / "small.txt").write_bytes(b"tiny") else "",
                          "http://127.0.0.1:%d/keep" % port))
    temp, inode = got["a"]
    assert os.path.dirname(temp) == str(tmpdir_uploads)
    assert (tmp_path / "saved" / "x.bin").read_bytes() == data  # safe_filename dropped ../../evil/
    assert inode == os.stat(tmp_path / "saved" / "x.bin").st_ino  # renamed, not copied
    assert got["b"][0] is None and (tmp_path / "saved" / "small.txt").read_bytes() == b"tiny"
    assert os.listdir(tmpdir_uploads) == []


def test_part_safe_filename():
    cases = {"../../etc/passwd": "passwd", "C:\\Users\\me\\cv.pdf": "cv.pdf", "..": "", "a/": "",
             "ok name.txt": "ok name.txt", "C:evil.txt": "C_evil.txt", "nul\x00x.txt": "nul_x.txt",
             "sub\\..": ""}
    for sent, safe in cases.items():
        assert minipub.Part("f", sent, "text/plain", 10).safe_filename == safe, sent


def _multipart(*parts, boundary="XyZ"):
    body = b"".join(b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode(), head, data) for head, data in parts)
    return body + b"--%s--\r\n" % boundary.encode()


def test_parse_multipart_edge_cases(tmp_path):
    app = upload_app(tmp_path)
    ctype = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    tricky = b"\r\n--XyY--XyZ\n--XyZ\r--Xy" * 30000 + b"\r\n--X"  # near-boundaries across every block edge
    body = (b"preamble to ignore\r\n" + _multipart(
        (b'Content-Disposition: form-data; name="f"; filename="a \\"q\\".bin"', tricky),
        (b"Content-Disposition: form-data; name=\"g\"; filename=\"x\"; filename*=UTF-8''%E2%82%AC.txt\r\n"
         b"Content-Type: image/png", b"png"),
        (b'content-disposition: form-data; name="v"', b"")) + b"epilogue")
    status, _, out = call_app(app, "POST", "/up", body=body, headers=ctype)
    got = json.loads(out)
    assert status == 200 and got["v"] == ""
    assert (got["f"]["filename"], got["f"]["sha256"]) == ('a "q".bin', _sha(tricky))
    assert (got["g"]["filename"], got["g"]["type"]) == ("€.txt", "image/png")
    quoted = {"Content-Type": 'multipart/form-data; boundary="a b"'}
    padded = b'--a b  \r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--a b--'
    assert json.loads(call_app(app, "POST", "/up", body=padded, headers=quoted)[2]) == {"x": "1"}
    bad = [(ctype, b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nunterminated"),
           (ctype, _multipart((b"Content-Disposition: form-data", b"no name"))),
           (ctype, _multipart((b"Content-Disposition: attachment; name=\"x\"", b""))),
           (ctype, _multipart((b'Content-Disposition: form-data; name="x"', b"\xff\xfe"))),
           (ctype, b"--XyZ junk\r\n"),
           ({"Content-Type": "multipart/form-data"}, b""),
           ({"Content-Type": "multipart/form-data; boundary=" + "x" * 71}, b"")]
    for headers, body in bad:
        assert call_app(app, "POST", "/up", body=body, headers=headers)[0] == 400, body[:60]


def test_parse_multipart_any_block_size(tmp_path, monkeypatch):
    """Whatever the contents and wherever the block edges fall, every byte comes back."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    app = upload_app(tmp_path, {"request.upload_spool_size": 16})
    content = st.binary(max_size=80).map(lambda b: b.replace(b"b", b"\r\n--").replace(b"c", b"\r"))

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(block=st.integers(1, 40), files=st.lists(content, min_size=1, max_size=4))
    def check(block, files):
        hypothesis.assume(not any(b"\r\n--XyZ" in f + b"\r\n" for f in files))
        monkeypatch.setattr(minipub, "_BLOCK", block)
        body = _multipart(*[(b'Content-Disposition: form-data; name="f%d"; filename="x"' % i, f)
                            for i, f in enumerate(files)])
        status, _, out = call_app(app, "POST", "/up", body=body,
                                  headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        got = json.loads(out)
        assert status == 200 and [got["f%d" % i]["sha256"] for i in range(len(files))] == [
            _sha(f) for f in files]
    check()


def test_upload_limits_413(serve, tmp_path, tmpdir_uploads):
    config = {"request.max_form_parts": 3, "request.max_form_field_size": 1000}
    port = serve(upload_app(tmp_path, config), max_request_body_size=200000).port
    url = "http://127.0.0.1:%d/up" % port
    (tmp_path / "big.bin").write_bytes(os.urandom(300000))

    def status(*args):
        return int(curl("-o", "/dev/null", "-w", "%{http_code}", *args, url))
    assert status("-F", "f=@%s" % (tmp_path / "big.bin")) == 413  # Content-Length over the limit
    assert status("-H", "Transfer-Encoding: chunked", "-F", "f=@%s" % (tmp_path / "big.bin")) == 413
    assert status("-F", "a=1", "-F", "b=2", "-F", "c=3", "-F", "d=4") == 413
    assert status("-F", "a=1", "-F", "b=2", "-F", "c=3") == 200
    assert status("-F", "a=" + "x" * 1001) == 413
    assert status("-F", "a=" + "x" * 600, "-F", "b=" + "x" * 600) == 413  # fields count together
    assert status("--data-urlencode", "a=" + "x" * 1000) == 413  # a whole urlencoded body
    assert status("-d", "a=1&b=2&c=3&d=4") == 413
    assert status("-d", "a=1&b=2") == 200
    assert os.listdir(tmpdir_uploads) == []


def test_upload_disconnect_leaves_no_temp_file(serve, tmp_path, tmpdir_uploads, caplog):
    port = serve(upload_app(tmp_path, {"request.upload_spool_size": 1024}), thread_pool=1).port
    head = (b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            b"Content-Length: 50000000\r\n\r\n"
            b'--B\r\nContent-Disposition: form-data; name="f"; filename="f.bin"\r\n\r\n')
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + b"x" * 500000)
        deadline = time.monotonic() + 10
        while not os.listdir(tmpdir_uploads):  # the upload has reached the disk
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while os.listdir(tmpdir_uploads):  # ... and is gone once the client is
        assert time.monotonic() < deadline, os.listdir(tmpdir_uploads)
        time.sleep(0.01)
    assert curl("http://127.0.0.1:%d/up" % port) == b"{}"  # one worker: the first request is over
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a gone client is no handler bug


# ===========================================================================
# Reloader
# ===========================================================================


# ===========================================================================
# Command line and examples
# ===========================================================================


# ===========================================================================
# Hostile clients and load
# ===========================================================================
