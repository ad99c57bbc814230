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

import base64
import hashlib
import re
import shutil

_HASHES = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
HAS_CURL = shutil.which("curl") is not None


class FakeClock:
    """An injected clock for nonce lifetimes: tests move time instead of sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def auth_app(clock=None, **digest_options):
    """/admin/ (Basic, class), /reports (Digest, handler), /md5 (MD5-first), /public."""
    @minipub.auth_basic("admin area", users={"alice": "s3cret", "jörg": "pässword"})
    class Admin:
        @minipub.expose
        def index(self):
            return "admin " + minipub.request.login

        class Deeper:
            @minipub.expose
            def index(self):
                return "deep " + minipub.request.login
        deeper = Deeper()

    options = dict(users={"bob": "pässword", "jörg": "geheim"}, clock=clock or time.monotonic)
    options.update(digest_options)

    class Root:
        admin = Admin()

        @minipub.expose
        def public(self):
            return "public"

        @minipub.expose
        @minipub.auth_digest("reports", **options)
        def reports(self, x=None):
            return "hello %s%s" % (minipub.request.login, "" if x is None else " x=" + x)

        @minipub.expose
        @minipub.auth_digest("old clients", users={"bob": "pw"}, algorithms=("MD5", "SHA-256"))
        def md5(self):
            return "md5 " + minipub.request.login
    return minipub.Application(Root())


def auth_call(app, path="/reports", auth=None, method="GET", body=b"", headers=None):
    """call_app, keeping every WWW-Authenticate field: (status, [challenges], body)."""
    fields = []

    def spy(environ, start_response):
        def keep(status, headers, exc_info=None):
            fields[:] = headers
            return start_response(status, headers, exc_info)
        return app(environ, keep)
    headers = dict(headers or {})
    if auth is not None:
        headers["Authorization"] = auth
    path, _, query = path.partition("?")
    status, _, data = call_app(spy, method, path, query, body, headers)
    return status, [v for k, v in fields if k.lower() == "www-authenticate"], data


def parse_challenge(value):
    scheme, _, rest = value.partition(" ")
    found = re.findall(r'([\w-]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))', rest)
    return dict((k.lower(), q or t) for k, q, t in found)


def digest(challenge, user="bob", password="pässword", method="GET", uri="/reports", nc=1,
           qop="auth", body=b"", **override):
    """The Authorization value a client computes from ``challenge`` (RFC 7616 3.4.1)."""
    c = parse_challenge(challenge)
    algorithm = override.pop("algorithm", c["algorithm"])

    def h(data):
        data = data.encode("utf-8") if isinstance(data, str) else data
        return hashlib.new(_HASHES[algorithm.upper().replace("-SESS", "")], data).hexdigest()
    cnonce = "0a4f113b"
    ha1 = h("%s:%s:%s" % (user, c["realm"], password))
    if algorithm.upper().endswith("-SESS"):
        ha1 = h("%s:%s:%s" % (ha1, c["nonce"], cnonce))
    a2 = "%s:%s" % (method, uri) + (":" + h(body) if qop == "auth-int" else "")
    params = {"username": user, "realm": c["realm"], "nonce": c["nonce"], "uri": uri,
              "algorithm": algorithm, "qop": qop, "nc": "%08x" % nc, "cnonce": cnonce,
              "opaque": c["opaque"],
              "response": h("%s:%s:%08x:%s:%s:%s" % (ha1, c["nonce"], nc, cnonce, qop, h(a2)))}
    params.update(override)
    text = ", ".join('%s="%s"' % (k, v) for k, v in params.items() if v is not None)
    return ("Digest " + text).encode("utf-8").decode("latin-1")  # what WSGI hands over


def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode("utf-8")).decode("ascii")


def first_challenge(app, path="/reports"):
    status, challenges, _ = auth_call(app, path)
    assert status == 401
    return challenges[0]


def test_auth_basic_protects_class_subtree_and_sets_login():
    app = auth_app()
    status, challenges, _ = auth_call(app, "/admin/")
    assert (status, challenges) == (401, ['Basic realm="admin area", charset="UTF-8"'])
    assert auth_call(app, "/admin/", basic("alice", "s3cret"))[::2] == (200, b"admin alice")
    assert auth_call(app, "/admin/deeper/", basic("alice", "s3cret"))[::2] == (200, b"deep alice")
    assert auth_call(app, "/admin/deeper/", basic("alice", "wrong"))[:2] == (401, challenges)
    assert auth_call(app, "/admin/", basic("nobody", "s3cret"))[0] == 401
    assert auth_call(app, "/admin/", basic("jörg", "pässword"))[::2] == (200, "admin jörg".encode())
    assert auth_call(app, "/public")[0] == 200


def test_auth_basic_checkpassword_gets_realm_user_password():
    calls = []

    @minipub.auth_basic("r", checkpassword=lambda *a: calls.append(a) or a[2] == "pass:with:colons")
    class Root:
        @minipub.expose
        def index(self):
            return minipub.request.environ.get("REMOTE_USER", "") + "/" + minipub.request.login
    app = minipub.Application(Root())
    assert auth_call(app, "/", basic("carol", "pass:with:colons"))[::2] == (200, b"/carol")
    assert auth_call(app, "/", basic("carol", "nope"))[0] == 401
    assert calls == [("r", "carol", "pass:with:colons"), ("r", "carol", "nope")]
    with pytest.raises(TypeError):
        minipub.auth_basic("r")


@pytest.mark.parametrize("header", [
    "Basic", "Basic !!!!", "Basic YWxpY2U", "Basic " + base64.b64encode(b"no colon").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Basic " + base64.b64encode(b"a:b\x01").decode(),
    "Basic YWxpY2U6czNjcmV0 YWxpY2U6czNjcmV0", "Basic " + "," * 10240])
def test_auth_basic_malformed_credentials_are_400(header):
    assert auth_call(auth_app(), "/admin/", header)[0] == 400


@pytest.mark.parametrize("header, status", [
    ("", 401), ("Bearer abc", 401), ("Negotiate", 401), ("Digest", 400), ("Digest ", 400),
    ('Digest username="bob', 400), ('Digest username="bob", realm=', 400),
    ("Digest username=bob realm=reports", 400), ("Digest =x", 400), ("Digest " + "," * 10240, 400),
    ('Digest username="a", Username="b"', 400), ("Digest " + "a=b, " * 40, 400),
    ("Digest " + "a" * 10000 + "=" + '"' * 1000, 400), ('Digest username="\xff"', 400)])
def test_auth_garbage_digest_headers_are_refused_fast(header, status):
    app = auth_app()
    started = time.monotonic()
    assert auth_call(app, "/reports", header)[0] == status
    assert time.monotonic() - started < 1.0  # linear scans: a regex blow-up would take seconds


def test_auth_digest_challenges_one_per_algorithm_preferred_first():
    status, challenges, _ = auth_call(auth_app(), "/reports")
    assert status == 401 and len(challenges) == 2
    first, second = map(parse_challenge, challenges)
    assert (first["algorithm"], second["algorithm"]) == ("SHA-256", "MD5")
    assert first["nonce"] == second["nonce"] and first["realm"] == "reports"
    assert first["qop"] == "auth, auth-int" and first["charset"] == "UTF-8" and first["opaque"]
    assert "stale" not in first and "userhash" not in first
    _, challenges, _ = auth_call(auth_app(), "/md5")
    assert [parse_challenge(c)["algorithm"] for c in challenges] == ["MD5", "SHA-256"]
    with pytest.raises(ValueError):
        minipub.auth_digest("r", users={}, algorithms=("SHA-1",))
    with pytest.raises(TypeError):
        minipub.auth_digest("r", users={}, get_ha1=lambda *a: None)


def test_auth_digest_sha256_response_computed_from_the_challenge():
    app = auth_app()
    challenge = first_challenge(app, "/reports?x=1")
    assert parse_challenge(challenge)["algorithm"] == "SHA-256"
    header = digest(challenge, uri="/reports?x=1")
    assert auth_call(app, "/reports?x=1", header)[::2] == (200, b"hello bob x=1")
    wrong = digest(challenge, password="password", uri="/reports?x=1", nc=2)
    status, challenges, _ = auth_call(app, "/reports?x=1", wrong)
    assert status == 401 and "stale" not in parse_challenge(challenges[0])


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256", "SHA-512-256", "MD5-sess", "SHA-256-sess"])
def test_auth_digest_each_algorithm_with_stored_ha1(algorithm):
    if "sha512_256" not in hashlib.algorithms_available and algorithm.startswith("SHA-512"):
        pytest.skip("this hashlib has no SHA-512/256")
    stored = {}  # what a deployment keeps instead of passwords: H(user:realm:password)
    for name in ("MD5", "SHA-256", "SHA-512-256"):
        if _HASHES[name] in hashlib.algorithms_available:
            stored[name] = hashlib.new(_HASHES[name], "bob:vault:pässword".encode()).hexdigest()
    calls = []

    def get_ha1(realm, user, base_algorithm):
        calls.append((realm, user, base_algorithm))
        return stored[base_algorithm] if user == "bob" else None

    class Root:
        @minipub.expose
        @minipub.auth_digest("vault", get_ha1=get_ha1, algorithms=(algorithm,))
        def index(self):
            return "in " + minipub.request.login
    app = minipub.Application(Root())
    challenge = first_challenge(app, "/")
    assert parse_challenge(challenge)["algorithm"] == algorithm
    assert auth_call(app, "/", digest(challenge, uri="/"))[::2] == (200, b"in bob")
    assert auth_call(app, "/", digest(challenge, user="eve", uri="/", nc=2))[0] == 401
    assert calls == [("vault", "bob", algorithm.replace("-sess", "")),
                     ("vault", "eve", algorithm.replace("-sess", ""))]


def test_auth_digest_replayed_header_is_refused():
    app = auth_app()
    header = digest(first_challenge(app))
    assert auth_call(app, "/reports", header)[0] == 200
    status, challenges, _ = auth_call(app, "/reports", header)
    assert status == 401 and parse_challenge(challenges[0])["stale"] == "true"


def test_auth_digest_nc_out_of_order_accepted_once_each_within_a_window():
    app = auth_app()
    challenge = first_challenge(app)
    for nc, want in [(3, 200), (1, 200), (2, 200), (2, 401), (3, 401), (70, 200), (6, 401),
                     (7, 200), (7, 401), (69, 200), (69, 401), (4000000000, 200), (70, 401)]:
        assert auth_call(app, "/reports", digest(challenge, nc=nc))[0] == want, nc
    assert auth_call(app, "/reports", digest(challenge, nc=0))[0] == 401


def test_auth_digest_uri_must_match_the_request_target():
    app = auth_app()
    challenge = first_challenge(app)
    # CherryPy 18 accepted credentials computed for /public on /secret.
    assert auth_call(app, "/reports", digest(challenge, uri="/public"))[0] == 400
    assert auth_call(app, "/reports?x=1", digest(challenge, uri="/reports"))[0] == 400
    assert auth_call(app, "/reports", digest(challenge, uri="/reports?x=1"))[0] == 400
    assert auth_call(app, "/reports", digest(challenge))[0] == 200


def test_auth_digest_realm_algorithm_opaque_and_forged_nonce_get_a_plain_401():
    app = auth_app()
    challenge = first_challenge(app)
    nonce = parse_challenge(challenge)["nonce"]
    forged = nonce[:20] + ("0" if nonce[20] != "0" else "1") + nonce[21:]
    for header in [digest(challenge, realm="other"), digest(challenge, algorithm="SHA-512-256"),
                   digest(challenge, opaque="00"), digest(challenge, nonce=forged),
                   digest(challenge, nonce=nonce.upper()), digest(challenge, nonce="x")]:
        status, challenges, _ = auth_call(app, "/reports", header)
        assert status == 401 and "stale" not in parse_challenge(challenges[0]), header
    assert auth_call(app, "/reports", digest(challenge, opaque=None))[0] == 200  # SHOULD echo


def test_auth_digest_expired_nonce_is_stale_and_the_retry_succeeds():
    clock = FakeClock()
    app = auth_app(clock=clock, nonce_lifetime=30)
    challenge = first_challenge(app)
    assert auth_call(app, "/reports", digest(challenge))[0] == 200
    clock.now += 31
    status, challenges, _ = auth_call(app, "/reports", digest(challenge, nc=2))
    fresh = parse_challenge(challenges[0])
    assert status == 401 and fresh["stale"] == "true"
    # An expired nonce with a wrong response is not stale: the user must be asked again.
    status, challenges, _ = auth_call(app, "/reports", digest(challenge, password="x", nc=3))
    assert status == 401 and "stale" not in parse_challenge(challenges[0])
    assert auth_call(app, "/reports", digest(challenges[0]))[::2] == (200, b"hello bob")


def test_auth_digest_non_ascii_user_and_password():
    app = auth_app()
    challenge = first_challenge(app)
    assert auth_call(app, "/reports", digest(challenge))[::2] == (200, b"hello bob")
    # A UTF-8 user name inside the quoted string (charset=UTF-8) ...
    status, _, body = auth_call(app, "/reports", digest(challenge, user="jörg", password="geheim", nc=2))
    assert (status, body) == (200, "hello jörg".encode())
    # ... or as username* (RFC 8187), which RFC 7616 3.4.4 asks for.
    header = digest(challenge, user="jörg", password="geheim", nc=3, username=None)
    header += ", username*=UTF-8''j%C3%B6rg"
    assert auth_call(app, "/reports", header)[::2] == (200, "hello jörg".encode())
    both = digest(challenge, user="jörg", password="geheim", nc=4) + ", username*=UTF-8''j%C3%B6rg"
    assert auth_call(app, "/reports", both)[0] == 400
    latin = digest(challenge, nc=5, username=None) + ", username*=ISO-8859-1''j%F6rg"
    assert auth_call(app, "/reports", latin)[0] == 400


def test_auth_digest_userhash():
    app = auth_app(userhash=True)
    challenge = first_challenge(app)
    assert parse_challenge(challenge)["userhash"] == "true"
    hashed = hashlib.sha256(b"bob:reports").hexdigest()
    header = digest(challenge, username=hashed) + ", userhash=true"
    assert auth_call(app, "/reports", header)[::2] == (200, b"hello bob")
    unknown = digest(challenge, nc=2, username=hashlib.sha256(b"eve:reports").hexdigest()) + ", userhash=true"
    assert auth_call(app, "/reports", unknown)[0] == 401
    plain = auth_app()
    offered_not = digest(first_challenge(plain)) + ", userhash=true"
    assert auth_call(plain, "/reports", offered_not)[0] == 400
    with pytest.raises(TypeError):
        minipub.auth_digest("r", get_ha1=lambda *a: None, userhash=True)


def test_auth_digest_auth_int_hashes_the_body_and_leaves_it_to_the_handler():
    @minipub.auth_digest("forms", users={"bob": "pässword"})
    class Root:
        @minipub.expose
        def save(self, title):
            return "%s saved %s" % (minipub.request.login, title)
    app = minipub.Application(Root())
    challenge = first_challenge(app, "/save")
    body = b"title=Dracula"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    header = digest(challenge, method="POST", uri="/save", qop="auth-int", body=body)
    assert auth_call(app, "/save", header, "POST", body, form)[::2] == (200, b"bob saved Dracula")
    header = digest(challenge, method="POST", uri="/save", qop="auth-int", body=body, nc=2)
    assert auth_call(app, "/save", header, "POST", b"title=Carmilla", form)[0] == 401
    header = digest(challenge, method="POST", uri="/save", qop="auth-conf", nc=3)
    assert auth_call(app, "/save", header, "POST", body, form)[0] == 400


def test_auth_digest_replay_table_is_bounded(monkeypatch):
    monkeypatch.setattr(minipub, "_NONCE_TABLE", 3)
    clock = FakeClock()
    app = auth_app(clock=clock)
    hook = app.root.reports._minipub_hooks[0]
    challenges = []
    for i in range(5):
        clock.now += 1  # nonces issued in order
        challenges.append(first_challenge(app))
        assert auth_call(app, "/reports", digest(challenges[-1]))[0] == 200
        assert len(hook.seen) <= 3
    # The two oldest nonces were forgotten to make room: refused as stale, never replayable.
    for old in challenges[:2]:
        status, fresh, _ = auth_call(app, "/reports", digest(old, nc=2))
        assert status == 401 and parse_challenge(fresh[0])["stale"] == "true"
    assert auth_call(app, "/reports", digest(challenges[-1], nc=2))[0] == 200
    clock.now += 301  # expired entries are dropped as new nonces arrive
    challenge = first_challenge(app)
    assert auth_call(app, "/reports", digest(challenge))[0] == 200 and len(hook.seen) == 1


def test_auth_decorators_return_the_object_and_keep_signature_binding():
    def handler(self, x=None):
        return "x"
    assert minipub.auth_digest("r", users={})(handler) is handler
    assert minipub.auth_basic("r", users={})(handler) is handler
    app = auth_app()
    challenge = first_challenge(app)
    # The hook runs before binding: an unexpected query parameter is still a 404, after auth.
    assert auth_call(app, "/reports?y=1", digest(challenge, uri="/reports?y=1"))[0] == 404
    assert auth_call(app, "/reports?y=1")[0] == 401


# -- real clients ---------------------------------------------------------------

def curl(*args):
    result = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, timeout=20)
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code), body, result.stderr.decode("utf-8", "replace")


@pytest.mark.skipif(not HAS_CURL, reason="curl not installed")
def test_auth_curl_basic_and_digest(serve):
    base = "http://127.0.0.1:%d" % serve(auth_app()).port
    assert curl("--basic", "-u", "alice:s3cret", base + "/admin/")[:2] == (200, b"admin alice")
    assert curl("--basic", "-u", "alice:wrong", base + "/admin/")[0] == 401
    assert curl("--basic", "-u", "jörg:pässword", base + "/admin/")[:2] == (200, "admin jörg".encode())
    # Digest: curl answers the first (SHA-256) challenge, with the UTF-8 bytes of the password.
    code, body, log = curl("-v", "--digest", "-u", "bob:pässword", base + "/reports?x=1")
    assert (code, body) == (200, b"hello bob x=1") and "algorithm=SHA-256" in log
    assert log.count("< WWW-Authenticate: Digest") == 2  # one field per challenge on the wire
    assert curl("--digest", "-u", "bob:password", base + "/reports")[0] == 401
    code, body, log = curl("-v", "--digest", "-u", "bob:pw", base + "/md5")
    assert (code, body) == (200, b"md5 bob") and "algorithm=MD5" in log
    assert curl("--digest", "-u", "jörg:geheim", base + "/reports")[:2] == (200, "hello jörg".encode())


@pytest.mark.parametrize("client", ["curl", "urllib"])
def test_auth_real_clients_retry_after_a_stale_nonce(serve, client):
    if client == "curl" and not HAS_CURL:
        pytest.skip("curl not installed")
    calls = []

    def clock():  # the first nonce is issued at 1000 s; the client "answers" 31 s later
        calls.append(None)
        return 1000.0 if len(calls) == 1 else 1031.0

    class Root:
        @minipub.expose
        @minipub.auth_digest("reports", users={"bob": "pw"}, algorithms=("MD5",), clock=clock,
                             nonce_lifetime=30)
        def reports(self):
            return "hello " + minipub.request.login
    url = "http://127.0.0.1:%d/reports" % serve(minipub.Application(Root())).port
    if client == "curl":
        # curl retries a 401 only when it says stale=true; a wrong password ends at 401.
        code, body, log = curl("-v", "--digest", "-u", "bob:pw", url)
        assert (code, body) == (200, b"hello bob") and "stale=true" in log
        assert log.count("> Authorization: Digest") == 2
    else:
        handler = urllib.request.HTTPDigestAuthHandler()
        handler.add_password("reports", url, "bob", "pw")
        assert urllib.request.build_opener(handler).open(url, timeout=10).read() == b"hello bob"
    assert len(calls) == 4  # nonce, stale check, new nonce, fresh check


def test_auth_urllib_basic_and_md5_first_digest(serve):
    base = "http://127.0.0.1:%d" % serve(auth_app()).port

    def opener(handler_class, realm, user, password):
        handler = handler_class()
        handler.add_password(realm, base, user, password)
        return urllib.request.build_opener(handler)
    basic_ok = opener(urllib.request.HTTPBasicAuthHandler, "admin area", "jörg", "pässword")
    assert basic_ok.open(base + "/admin/", timeout=10).read() == "admin jörg".encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener(urllib.request.HTTPBasicAuthHandler, "admin area", "alice", "x").open(base + "/admin/", timeout=10)
    assert refused.value.code == 401
    digest_ok = opener(urllib.request.HTTPDigestAuthHandler, "old clients", "bob", "pw")
    assert digest_ok.open(base + "/md5", timeout=10).read() == b"md5 bob"
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener(urllib.request.HTTPDigestAuthHandler, "old clients", "bob", "x").open(base + "/md5", timeout=10)
    assert refused.value.code == 401
    # urllib reads only the first challenge and knows MD5 and SHA-1: SHA-256 first defeats it.
    with pytest.raises(ValueError, match="SHA-256"):
        opener(urllib.request.HTTPDigestAuthHandler, "reports", "bob", "pw").open(base + "/reports", timeout=10)


def test_auth_garbage_over_the_wire_gets_quick_answers(serve):
    port = serve(auth_app()).port
    started = time.monotonic()
    for path, value, status in [("/reports", b"Digest " + b"," * 10240, 400),
                                ("/reports", b'Digest username="bob', 400),
                                ("/admin/", b"Basic " + b"," * 10240, 400),
                                ("/admin/", b"Token xyz", 401), ("/admin/", b"", 401)]:
        raw = exchange(port, b"GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
                       % (path.encode(), value))
        assert responses(raw)[0][0] == status, (path, value[:20])
    assert time.monotonic() - started < 2.0


# ===========================================================================
# Tools: static files
# ===========================================================================


# ===========================================================================
# Tools: uploads
# ===========================================================================


# ===========================================================================
# Reloader
# ===========================================================================


# ===========================================================================
# Command line and examples
# ===========================================================================


# ===========================================================================
# Hostile clients and load
# ===========================================================================
