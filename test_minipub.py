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


class _Site:
    """A tiny tree that says which site answered and what it saw."""

    def __init__(self, name):
        self.name = name

    @minipub.expose
    def index(self):
        return self.name

    @minipub.expose
    def whoami(self):
        r = minipub.request
        return "%s %s %s %s %s" % (self.name, r.remote_addr, r.scheme, r.base, r.environ["wsgi.url_scheme"])

    @minipub.expose
    def go(self):
        raise minipub.HTTPRedirect("/target")


class _Api(_Site):
    @minipub.expose
    def secret(self):
        return "api secret"


def _vhost(**options):
    return minipub.VirtualHost(default=_Site("main"), domains={
        "www.example.com": _Site("www"), "API.example.com": _Api("api"),
        "admin.example.com:8443": _Site("admin")}, **options)


def call_from(app, remote, path="/", scheme="http", headers=None):
    """Like call_app, but from peer ``remote`` over ``scheme`` (call_app cannot set REMOTE_ADDR)."""
    environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
               "REMOTE_ADDR": remote, "wsgi.url_scheme": scheme, "wsgi.input": io.BytesIO(b"")}
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    wsgiref.util.setup_testing_defaults(environ)
    if not (headers or {}).get("Host"):
        environ.pop("HTTP_HOST", None)
    captured = {}

    def start_response(status, fields, exc_info=None):
        captured["status"], captured["headers"] = status, fields
    result = wsgiref.validate.validator(app)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    return int(captured["status"][:3]), {k.lower(): v for k, v in captured["headers"]}, data


@pytest.mark.parametrize("host, scheme, expected", [
    ("www.example.com", "http", b"www"), ("WWW.Example.COM", "http", b"www"),
    ("www.example.com.", "http", b"www"), ("www.example.com:80", "http", b"www"),
    ("www.example.com:443", "https", b"www"), ("www.example.com:8080", "http", b"www"),
    ("api.example.com", "http", b"api"), ("Api.Example.Com.:80", "http", b"api"),
    ("admin.example.com:8443", "http", b"admin"), ("ADMIN.example.com.:8443", "https", b"admin"),
    ("admin.example.com", "http", b"main"), ("admin.example.com:443", "https", b"main"),
    ("other.example.com", "http", b"main"), ("127.0.0.1:8080", "http", b"main"),
])
def test_vhost_host_variations(host, scheme, expected):
    app = minipub.Application(_vhost())
    status, _, body = call_from(app, "192.0.2.9", "/", scheme, {"Host": host})
    assert (status, body) == (200, expected)


def test_vhost_unknown_host_without_default_is_400():
    app = minipub.Application(minipub.VirtualHost(domains={"www.example.com": _Site("www")}))
    assert call_from(app, "192.0.2.9", "/", headers={"Host": "www.example.com"})[2] == b"www"
    assert call_from(app, "192.0.2.9", "/", headers={"Host": "evil.example"})[0] == 400
    assert call_from(app, "192.0.2.9", "/", headers={})[0] == 400  # HTTP/1.0 without Host
    with pytest.raises(ValueError):
        minipub.VirtualHost(domains={"bad host": _Site("x")})


def test_vhost_no_cross_host_path_prefix():
    app = minipub.Application(_vhost())
    assert call_from(app, "192.0.2.9", "/secret", headers={"Host": "api.example.com"})[2] == b"api secret"
    for path in ("/secret", "/api/secret", "/api.example.com/secret", "/domains", "/default/secret",
                 "/_minipub_resolve"):
        assert call_from(app, "192.0.2.9", path, headers={"Host": "www.example.com"})[0] == 404, path


def test_vhost_absolute_form_authority_wins_over_host(serve):
    server = serve(minipub.Application(_vhost()))
    raw = exchange(server.port, b"GET http://API.example.com./secret HTTP/1.1\r\nHost: www.example.com\r\n"
                                b"Connection: close\r\n\r\n")
    assert responses(raw)[0][::2] == (200, b"api secret")
    raw = exchange(server.port, b"GET /secret HTTP/1.1\r\nHost: api.example.com:%d\r\n"
                                b"Connection: close\r\n\r\n" % server.port)
    assert responses(raw)[0][::2] == (200, b"api secret")


def test_vhost_x_forwarded_host_only_when_enabled_and_trusted():
    spoof = {"Host": "www.example.com", "X-Forwarded-Host": "api.example.com"}
    trusted = {"server.trusted_proxies": ("10.0.0.0/8",)}
    # ignored by default, even from a trusted proxy
    assert call_from(minipub.Application(_vhost(), trusted), "10.1.2.3", "/", headers=spoof)[2] == b"www"
    # enabled: honoured from the trusted proxy (default: server.trusted_proxies), not from a client
    app = minipub.Application(_vhost(use_x_forwarded_host=True), trusted)
    assert call_from(app, "10.1.2.3", "/", headers=spoof)[2] == b"api"
    assert call_from(app, "192.0.2.9", "/", headers=spoof)[2] == b"www"
    # VirtualHost's own trusted_proxies replace the server's
    app = minipub.Application(_vhost(use_x_forwarded_host=True, trusted_proxies=["192.0.2.9"]), trusted)
    assert call_from(app, "192.0.2.9", "/", headers=spoof)[2] == b"api"
    assert call_from(app, "10.1.2.3", "/", headers=spoof)[2] == b"www"
    # RFC 7239 host= counts as well
    app = minipub.Application(_vhost(use_x_forwarded_host=True), trusted)
    fwd = {"Host": "backend:8000", "Forwarded": 'for=192.0.2.1;host="admin.example.com:8443"'}
    assert call_from(app, "10.1.2.3", "/", headers=fwd)[2] == b"admin"


@pytest.mark.parametrize("remote, headers, expected", [
    # untrusted peer: every proxy header ignored
    ("192.0.2.9", {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
                   "X-Forwarded-Host": "evil.example"}, "main 192.0.2.9 http http://www.example.com http"),
    ("192.0.2.9", {"Forwarded": "for=6.6.6.6;proto=https"}, "main 192.0.2.9 http http://www.example.com http"),
    # trusted peer: X-Forwarded-*; the client's own XFF entry (left) cannot spoof
    ("10.0.0.1", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7", "X-Forwarded-Proto": "https",
                  "X-Forwarded-Host": "pub.example"}, "main 198.51.100.7 https https://pub.example http"),
    # a chain of trusted proxies is skipped from the right
    ("10.0.0.1", {"X-Forwarded-For": "198.51.100.7, 10.9.9.9"}, "main 198.51.100.7 http http://www.example.com http"),
    # RFC 7239: quoted IPv6 with port, proto and host from the outermost trusted proxy's element
    ("10.0.0.1", {"Forwarded": 'for=6.6.6.6;proto=http, for="[2001:db8:cafe::17]:4711";proto=HTTPS;'
                               'host="pub.example:8443", for=10.2.2.2;proto=http'},
     "main 2001:db8:cafe::17 https https://pub.example:8443 http"),
    # Forwarded wins over X-Forwarded-*
    ("10.0.0.1", {"Forwarded": "for=198.51.100.7", "X-Forwarded-For": "6.6.6.6"},
     "main 198.51.100.7 http http://www.example.com http"),
    # an IPv4-mapped peer address from a dual-stack socket is still the trusted proxy
    ("::ffff:10.0.0.1", {"X-Forwarded-For": "198.51.100.7"}, "main 198.51.100.7 http http://www.example.com http"),
])
def test_forwarded_headers_only_from_trusted_proxies(remote, headers, expected):
    app = minipub.Application(_Site("main"), {"server.trusted_proxies": ("10.0.0.0/8",)})
    status, _, body = call_from(app, remote, "/whoami", headers=dict(headers, Host="www.example.com"))
    assert (status, body.decode()) == (200, expected)


def test_forwarded_malformed_is_logged_and_ignored(caplog):
    app = minipub.Application(_Site("main"), {"server.trusted_proxies": ("10.0.0.1",)})
    for bad in ('for=198.51.100.7;proto=https;proto=http', 'for="198.51.100.7', 'for 198.51.100.7',
                'for=198.51.100.7;proto=gopher', 'for=198.51.100.7;host="a b"'):
        caplog.clear()
        body = call_from(app, "10.0.0.1", "/whoami", headers={"Host": "h", "Forwarded": bad})[2]
        assert body.decode() == "main 10.0.0.1 http http://h http", bad
        assert "ignored proxy headers" in caplog.text, bad


def test_trusted_proxies_parsed_once_and_checked_early():
    assert minipub._trusted_networks(("10.0.0.0/8", "::1")) is minipub._trusted_networks(("10.0.0.0/8", "::1"))
    with pytest.raises(minipub.ConfigError):
        minipub.Application(_Site("main"), {"server.trusted_proxies": ("10.0.0.300",)})
    with pytest.raises(minipub.ConfigError):
        minipub.VirtualHost(trusted_proxies=["not-an-address"])


def test_redirects_use_public_scheme_and_host():
    app = minipub.Application(_Site("main"), {"server.trusted_proxies": ("10.0.0.1",)})
    headers = {"Host": "backend:8000", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "pub.example"}
    status, fields, _ = call_from(app, "10.0.0.1", "/go", headers=headers)
    assert (status, fields["location"]) == (303, "https://pub.example/target")
    status, fields, _ = call_from(app, "192.0.2.9", "/go", headers=headers)
    assert (status, fields["location"]) == (303, "http://backend:8000/target")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port, proc, what, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError("%s exited: %s" % (what, proc.stderr.read().decode(errors="replace")))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # polling for readiness, bounded by the deadline
    raise AssertionError("%s did not listen on %d within %ss" % (what, port, deadline))


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


NGINX = "/usr/sbin/nginx"


@pytest.fixture
def nginx(tmp_path, tls):
    """nginx(upstream_port, proxy_headers) -> (http_port, https_port) of a real nginx on loopback."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx is not installed at %s" % NGINX)
    procs = []

    def start(upstream, headers):
        ports = _free_port(), _free_port()
        d = tmp_path / ("nginx%d" % len(procs))
        d.mkdir()
        user = "user root;" if os.geteuid() == 0 else ""  # workers must reach tmp_path (mode 0700)
        temps = "".join("%s_temp_path %s/%s;\n" % (k, d, k) for k in ("client_body", "proxy", "fastcgi",
                                                                       "uwsgi", "scgi"))
        (d / "nginx.conf").write_text("""
daemon off; %s worker_processes 1; pid %s/nginx.pid; error_log %s/error.log;
events { worker_connections 64; }
http {
  access_log off; %s
  server {
    listen 127.0.0.1:%d; listen 127.0.0.1:%d ssl;
    ssl_certificate %s; ssl_certificate_key %s;
    location / { proxy_pass http://127.0.0.1:%d; proxy_http_version 1.1; proxy_redirect off; %s }
  }
}""" % (user, d, d, temps, ports[0], ports[1], tls["fullchain"], tls["leaf_key"], upstream, headers))
        proc = subprocess.Popen([NGINX, "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        for port in ports:
            _wait_listening(port, proc, "nginx")
        return ports
    yield start
    for proc in procs:
        _stop(proc)


def _through(url, tls, *args):
    """curl from 127.0.0.2, so the client address differs from the proxy's 127.0.0.1."""
    out = _curl("--interface", "127.0.0.2", "--cacert", tls["ca"], "-o", "-", "-w", "\n%{http_code} %{redirect_url}",
                *args, url)
    assert out.returncode == 0, out.stderr
    body, _, tail = out.stdout.decode().rpartition("\n")
    return body, tail


def _check_proxied(http_port, https_port, tls):
    body, _ = _through("http://127.0.0.1:%d/whoami" % http_port, tls, "-H", "Host: api.example.com",
                       "-H", "X-Forwarded-For: 6.6.6.6")
    assert body == "api 127.0.0.2 http http://api.example.com http"
    body, _ = _through("https://localhost:%d/whoami" % https_port, tls)
    assert body == "main 127.0.0.2 https https://localhost:%d http" % https_port
    _, tail = _through("https://localhost:%d/go" % https_port, tls)
    assert tail == "303 https://localhost:%d/target" % https_port
    body, _ = _through("https://localhost:%d/secret" % https_port, tls)  # no path into another host's tree
    assert "404" in body


def test_nginx_in_front_of_minipub(serve, nginx, tls):
    app = minipub.Application(_vhost(), {"server.trusted_proxies": ("127.0.0.1",)})
    server = serve(app)
    ports = nginx(server.port, "proxy_set_header Host $http_host; proxy_set_header X-Forwarded-Proto $scheme; "
                               "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;")
    _check_proxied(*ports, tls)
    # the same headers straight from a client (127.0.0.2, not trusted) change nothing
    body, _ = _through("http://127.0.0.1:%d/whoami" % server.port, tls, "-H", "X-Forwarded-For: 6.6.6.6",
                       "-H", "X-Forwarded-Proto: https", "-H", "Host: www.example.com")
    assert body == "www 127.0.0.2 http http://www.example.com http"


def test_nginx_in_front_of_gunicorn(nginx, tls, tmp_path):
    if subprocess.run([sys.executable, "-c", "import gunicorn"], capture_output=True).returncode:
        pytest.skip("gunicorn is not installed (pip install gunicorn)")
    (tmp_path / "proxied_app.py").write_text(
        "import minipub, test_minipub as t\n"
        "application = minipub.Application(t._vhost(use_x_forwarded_host=True),\n"
        "                                  {'server.trusted_proxies': ('127.0.0.1',)})\n")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=HERE)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "--chdir", str(tmp_path),
                             "-b", "127.0.0.1:%d" % port, "proxied_app:application"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(port, proc, "gunicorn")
        # nginx sends its own upstream name as Host; the public one goes in RFC 7239 Forwarded
        ports = nginx(port, 'proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=\\"$http_host\\"";')
        _check_proxied(*ports, tls)
    finally:
        _stop(proc)


# -- HTTPS and binding ---------------------------------------------------------

def _openssl(*args, cwd):
    subprocess.run(("openssl",) + args, cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(cwd, name, cn, issuer, extensions):
    """A P-256 key and certificate ``name``.pem signed by ``issuer`` (self-signed if None)."""
    with open(os.path.join(cwd, name + ".ext"), "w") as f:
        f.write("subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n" + extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + cn, cwd=cwd)
    sign = ("-signkey", name + ".key") if issuer is None else ("-CA", issuer + ".pem", "-CAkey", issuer + ".key")
    _openssl("x509", "-req", "-in", name + ".csr", "-out", name + ".pem", "-days", "2", "-sha256",
             "-set_serial", str(abs(hash(name)) % 10 ** 12 + 1), "-extfile", name + ".ext", *sign, cwd=cwd)


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    """CA -> intermediate -> leaves for localhost and api.example.test, made with the openssl CLI."""
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("the openssl command is not installed")
    d = str(tmp_path_factory.mktemp("tls"))
    ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
    _issue(d, "ca", "minipub test CA", None, ca)
    _issue(d, "int", "minipub test intermediate", "ca", ca.replace("TRUE", "TRUE,pathlen:0"))
    leaf = "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n"
    _issue(d, "leaf", "localhost", "int", leaf % "DNS:localhost,IP:127.0.0.1")
    _issue(d, "api", "api.example.test", "int", leaf % "DNS:api.example.test")
    paths = {name: os.path.join(d, name + ext) for name in ("ca", "int", "leaf", "api") for ext in (".pem",)}
    paths.update({name + "_key": os.path.join(d, name + ".key") for name in ("leaf", "api")})
    with open(os.path.join(d, "fullchain.pem"), "w") as out:
        out.write(open(paths["leaf"]).read() + open(paths["int"]).read())
    paths["fullchain"] = out.name
    return paths


def _tls_options(tls, chain=True):
    return {"ssl_certificate": tls["leaf"], "ssl_private_key": tls["leaf_key"],
            "ssl_certificate_chain": tls["int"] if chain else ""}


def _curl(*args, timeout=20):
    return subprocess.run(("curl", "-sS", "--max-time", "10") + args, capture_output=True, timeout=timeout)


def test_https_curl_verifies_chain_with_intermediate(serve, tls):
    app = minipub.Application(_Site("main"))
    server = serve(app, **_tls_options(tls))
    out = _curl("-v", "--cacert", tls["ca"], "https://localhost:%d/whoami" % server.port)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == "main 127.0.0.1 https https://localhost:%d https" % server.port
    assert b"issuer: CN=minipub test intermediate" in out.stderr
    assert b"ALPN: server accepted http/1.1" in out.stderr
    # control: without the chain file the client cannot link the leaf to the CA
    bare = serve(app, **_tls_options(tls, chain=False))
    out = _curl("--cacert", tls["ca"], "https://localhost:%d/" % bare.port)
    assert out.returncode == 60, out.stderr


def _s_client(port, *args):
    return subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-servername", "localhost",
                           *args], input=b"", capture_output=True, timeout=20)


def test_tls_versions_and_alpn(serve, tls):
    server = serve(hello_app, **_tls_options(tls))
    # SECLEVEL=0 lets the *client* offer TLS 1.1, so the refusal is the server's
    old = _s_client(server.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0 and b"alert protocol version" in old.stderr, old.stderr
    for flag, name in (("-tls1_2", b"TLSv1.2"), ("-tls1_3", b"TLSv1.3")):
        out = _s_client(server.port, flag, "-alpn", "http/1.1", "-showcerts")
        assert out.returncode == 0, out.stderr
        assert b"Protocol  : " + name in out.stdout or b"New, " + name in out.stdout
        assert b"ALPN protocol: http/1.1" in out.stdout
        assert b"1 s:CN = minipub test intermediate" in out.stdout


def test_tls_silent_clients_do_not_stall_others(serve, tls):
    import http.client
    import ssl
    server = serve(hello_app, thread_pool=2, **_tls_options(tls))
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(5)]
    try:
        context = ssl.create_default_context(cafile=tls["ca"])
        started = time.monotonic()
        conn = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=5)
        conn.request("POST", "/", body=b"tls")
        answer = conn.getresponse().read()
        elapsed = time.monotonic() - started
        conn.close()
        assert answer == b"hello tls" and elapsed < 1.0, elapsed
        for sock in idle:  # the silent clients were really held open, waiting for their handshake
            sock.settimeout(0.05)
            with pytest.raises(socket.timeout):
                sock.recv(1)
    finally:
        for sock in idle:
            sock.close()


def test_plain_http_to_tls_port_gets_400(serve, tls, caplog):
    server = serve(hello_app, **_tls_options(tls))
    raw = exchange(server.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ") and b"https://" in raw
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_sni_chooses_the_domain_certificate(serve, tls):
    root = minipub.VirtualHost(default=_Site("main"), domains={
        "api.example.test": (_Site("api"), tls["api"], tls["api_key"], tls["int"])})
    server = serve(minipub.Application(root), **_tls_options(tls))
    resolve = "api.example.test:%d:127.0.0.1" % server.port
    out = _curl("--cacert", tls["ca"], "--resolve", resolve, "https://api.example.test:%d/" % server.port)
    assert (out.returncode, out.stdout) == (0, b"api"), out.stderr
    out = _curl("--cacert", tls["ca"], "https://localhost:%d/" % server.port)
    assert (out.returncode, out.stdout) == (0, b"main"), out.stderr
    out = _s_client(server.port, "-servername", "API.example.test")
    assert b"subject=CN = api.example.test" in out.stdout


def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host, connect_to", [
    ("0.0.0.0", ["127.0.0.1"]), ("::1", ["::1"]), ("::", ["::1", "127.0.0.1"]), ("localhost", ["127.0.0.1"])])
def test_bind_addresses(host, connect_to):
    if ":" in host and not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    if host == "::" and not socket.has_dualstack_ipv6():
        connect_to = ["::1"]
    server = minipub.Server(hello_app, host, 0).start()
    try:
        for addr in connect_to:
            raw = exchange(server.port, b"GET / HTTP/1.0\r\n\r\n") if addr == "127.0.0.1" else None
            if addr == "::1":
                with socket.create_connection(("::1", server.port), timeout=5) as sock:
                    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    raw = sock.recv(65536)
            assert raw.startswith(b"HTTP/1.1 200 "), (host, addr)
        assert server.urls[0].startswith("http://%s:%d/" % ("[%s]" % host if ":" in host else host, server.port))
    finally:
        server.stop(10)


def test_cli_bind_errors_are_one_line_and_status_2():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for args in (["--port", str(busy.getsockname()[1])], ["--host", "192.0.2.1", "--port", "8080"]):
            out = subprocess.run([sys.executable, os.path.join(HERE, "minipub.py"), "examples.hello:Root"] + args,
                                 cwd=HERE, capture_output=True, timeout=30)
            assert out.returncode == 2, out.stderr
            assert out.stderr.decode().count("\n") == 1 and "cannot listen" in out.stderr.decode()
    finally:
        busy.close()


# ===========================================================================
# Tools: authentication
# ===========================================================================


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
