"""An appliance's admin pages: log in, see the status, change the settings, log out.

Run it from the repository root, then open http://127.0.0.1:8080/ ::

    ADMIN_PASSWORD='a long passphrase' python minipub.py examples.admin:Root

The user is ``admin``; without ADMIN_PASSWORD the password is "change me".
Sessions are kept in SQLite (ADMIN_SESSION_DB, default admin-sessions.db in
the working directory), so a login survives the reloader and ``gunicorn -w 4``.
Every form is protected from cross-site posts by tools.csrf and its token.
"""

import hashlib
import hmac
import html
import os
import time

import minipub

_SALT = b"minipub admin example"  # one user, one salt: a real appliance stores a salt per user


def _hash(password: str) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), _SALT, 100_000)


USERS = {"admin": _hash(os.environ.get("ADMIN_PASSWORD", "change me"))}
SETTINGS = {"hostname": "appliance", "ntp_server": "pool.ntp.org"}
STARTED = time.time()


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>%s</title></head>\n<body><h1>%s</h1>\n%s\n"
            "</body></html>\n" % (html.escape(title), html.escape(title), body))


def _token_field() -> str:
    return '<input type="hidden" name="csrf_token" value="%s">' % minipub.csrf_token()


def _user() -> str:
    user = minipub.session.get("user")
    if user is None:
        raise minipub.HTTPRedirect("/login")
    return user


def _login_form(message: str = "") -> str:
    return _page("Log in", '%s<form method="post" action="/login">%s'
                           '<label>User <input name="user" autocomplete="username"></label>\n'
                           '<label>Password <input name="password" type="password"></label>\n'
                           '<button>Log in</button></form>' % (message, _token_field()))


class Root:
    _cp_config = {"tools.sessions.on": True, "tools.sessions.storage_type": "sqlite",
                  "tools.sessions.storage_path": os.environ.get("ADMIN_SESSION_DB", "admin-sessions.db"),
                  "tools.sessions.timeout": 30, "tools.csrf.on": True}

    @minipub.expose
    def index(self):
        user = _user()
        rows = "".join("<tr><th>%s</th><td>%s</td></tr>" % (html.escape(k), html.escape(v))
                       for k, v in SETTINGS.items())
        return _page("Status", '<p>Logged in as %s. Up %d s.</p><table>%s</table>\n'
                               '<p><a href="/settings">Settings</a></p>\n'
                               '<form method="post" action="/logout">%s<button>Log out</button></form>'
                     % (html.escape(user), time.time() - STARTED, rows, _token_field()))

    @minipub.expose
    def login(self, user: str = "", password: str = ""):
        if minipub.request.method != "POST":
            return _login_form()
        known = USERS.get(user)
        if known is None or not hmac.compare_digest(known, _hash(password)):
            minipub.response.status = 403
            return _login_form("<p>Wrong user or password.</p>")
        minipub.session.regenerate()  # a new id on login: a planted id gains nothing
        minipub.session["user"] = user
        raise minipub.HTTPRedirect("/", 303)

    @minipub.expose
    def logout(self):
        if minipub.request.method == "POST":
            minipub.session.delete()
        raise minipub.HTTPRedirect("/login", 303)

    @minipub.expose
    def settings(self, hostname: str = None, ntp_server: str = None, saved: str = ""):
        _user()
        error = ""
        if minipub.request.method == "POST":
            if not hostname or not ntp_server or any(c.isspace() for c in hostname + ntp_server):
                error = "<p>Both fields are needed, without spaces.</p>"
            else:
                SETTINGS.update(hostname=hostname, ntp_server=ntp_server)
                raise minipub.HTTPRedirect("/settings?saved=1", 303)
        fields = "".join('<label>%s <input name="%s" value="%s"></label>\n' % (name, name, html.escape(value))
                         for name, value in SETTINGS.items())
        note = "<p>Saved.</p>" if saved else error
        return _page("Settings", '%s<form method="post" action="/settings">%s%s<button>Save</button></form>\n'
                                 '<p><a href="/">Status</a></p>' % (note, _token_field(), fields))


if __name__ == "__main__":
    minipub.quickstart(Root())
