#!/usr/bin/python3
"""The test bed's token server: docker's token auth, the realm a registry
with `auth: token` sends clients to, issuing SHORT-LIVED tokens.

  tokenserver.py --port P --users FILE --cert OUT.pem --ttl SECONDS
                 [--issuer I] [--service S] [--expires-in N]

FILE holds `user:password` lines (a test bed's throwaway users, in plain
text). Before it listens, the server writes a fresh self-signed P-256
certificate to OUT.pem, the registry's `rootcertbundle`; every token is an
ES256 JWT that carries that certificate in its `x5c` header.

distribution 2.8 accepts a token until 60 s (its leeway) after the token's
`exp`, so `exp` is set TTL - 60 s after issue: the registry honours a token
for TTL seconds. `expires_in` is not sent unless --expires-in is given, so
a client assumes the spec's default (60 s) and meets the expiry as a 401 in
the middle of its work, which is what the tests exercise.

Each request is logged to stdout as one JSON line: {"user", "scope",
"issued"} (issued false for a refusal).

Uses Debian's python3-jwt and python3-cryptography only.
"""

import argparse
import base64
import datetime
import json
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# distribution's clock-skew leeway on `exp` and `nbf` (registry/auth/token).
REGISTRY_LEEWAY = 60
ACTIONS = {"pull", "push"}


def make_cert(path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tarn-testbed-tokens")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    with open(path + ".tmp", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    # Renamed into place: the test bed waits for the file to exist.
    import os

    os.replace(path + ".tmp", path)
    der = cert.public_bytes(serialization.Encoding.DER)
    return key, base64.b64encode(der).decode()


def load_users(path):
    users = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if ":" in line:
                user, password = line.split(":", 1)
                users[user] = password
    return users


def access_for(scopes):
    """`repository:NAME:pull,push` scopes as the token's access claim."""
    access = []
    for scope in scopes:
        parts = scope.split(":")
        if len(parts) < 3 or parts[0] != "repository":
            continue
        name = ":".join(parts[1:-1])
        actions = sorted(ACTIONS & set(parts[-1].split(",")))
        access.append({"type": "repository", "name": name, "actions": actions})
    return access


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--users", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--ttl", type=int, default=5)
    p.add_argument("--issuer", default="tarn-testbed-tokens")
    p.add_argument("--service", default="tarn-testbed")
    p.add_argument("--expires-in", type=int, default=None)
    args = p.parse_args()

    key, cert_b64 = make_cert(args.cert)
    users = load_users(args.users)
    lock = threading.Lock()

    def log(**fields):
        with lock:
            print(json.dumps(fields), flush=True)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def answer(self, status, body, extra=()):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def user(self):
            h = self.headers.get("Authorization", "")
            if not h.lower().startswith("basic "):
                return None
            try:
                user, password = base64.b64decode(h[6:]).decode().split(":", 1)
            except (ValueError, UnicodeDecodeError):
                return None
            return user if users.get(user) == password else None

        def do_POST(self):
            # The OAuth form containerd sends with a password:
            # grant_type=password, username, password, service, scope.
            length = min(int(self.headers.get("Content-Length", "0") or 0), 1 << 16)
            form = parse_qs(self.rfile.read(length).decode(errors="replace"))
            user = form.get("username", [None])[0]
            if form.get("grant_type", [""])[0] != "password" or users.get(user) != form.get("password", [None])[0]:
                user = None
            self.issue(user, form.get("scope", [" "])[0].split(" "), form.get("service", [args.service])[0])

        def do_GET(self):
            url = urlparse(self.path)
            if url.path != "/token":
                self.answer(404, {"error": "not found"})
                return
            query = parse_qs(url.query)
            self.issue(self.user(), query.get("scope", []), query.get("service", [args.service])[0])

        def issue(self, user, scopes, service):
            scopes = [s for s in scopes if s]
            if user is None:
                log(user=None, scope=scopes, issued=False)
                self.answer(
                    401,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "bad or no credentials"}]},
                    [("WWW-Authenticate", 'Basic realm="tarn-testbed-tokens"')],
                )
                return
            now = int(time.time())
            claims = {
                "iss": args.issuer,
                "sub": user,
                "aud": service,
                "iat": now,
                "nbf": now,
                "exp": now + args.ttl - REGISTRY_LEEWAY,
                "jti": secrets.token_hex(8),
                "access": access_for(scopes),
            }
            token = jwt.encode(claims, key, algorithm="ES256", headers={"x5c": [cert_b64]})
            body = {"token": token, "access_token": token}
            if args.expires_in is not None:
                body["expires_in"] = args.expires_in
            log(user=user, scope=scopes, issued=True)
            self.answer(200, body)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(json.dumps({"listening": args.port}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
