"""What stands between the network and the API: keys, browsers, body size, and the answer to a crash.

`Guard` is plain ASGI middleware (Starlette's BaseHTTPMiddleware would re-buffer streams) that
create_app installs, so uvicorn and every Ray Serve replica refuse the same requests, from their
headers alone, before a body is read or the engine sees them:

- Host (403). Bound to a loopback address, a Host that is neither a loopback name or address nor
  in `allowed_hosts` is refused: a web page that rebinds its own name to 127.0.0.1 still sends its
  name (DNS rebinding; Ollama's check). Bound elsewhere, the check applies once `allowed_hosts` is set.
- Origin (403). A browser names the page behind a request; one neither the server's own nor in
  `allowed_origins` is refused. CORS headers (and preflight answers) go to allowed origins only.
- API key (401), when keys are set, on every path but the public ones (/health, static pages).
- Content-Type (415). A body must be application/json: a cross-site page can send text/plain or a
  form without asking first, but JSON needs a preflight, which the Origin check refuses.
- Size (413). A Content-Length over `max_body_bytes`, or a chunked body counted as it arrives: it is
  read no further, and the connection is closed.

Every response carries an X-Request-Id (a completion's id has the same hex); an exception is logged
with its traceback and that id, and answered 500 with a generic message (its text could hold paths
or prompts).
"""

import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

log = logging.getLogger("charrnn_serve")

MIB = 1 << 20
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}
EXPOSED_HEADERS = b"X-Request-Id, X-Replica, Retry-After"


@dataclass(frozen=True)
class SecurityOptions:
    """charrnn-serve's security flags (picklable: Ray ships them to every replica).

    `allowed_origins`: "scheme://host[:port]" or "*"; `allowed_hosts`: names or addresses, no port;
    `bind_host`: the address listened on, which decides whether Host is checked; `state_secret`:
    the key continuation tokens are signed with (tokens.py; None: a random one for this app)."""

    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    bind_host: str = "127.0.0.1"
    max_body_bytes: int = MIB
    state_secret: bytes | None = field(default=None, repr=False)


@functools.lru_cache(maxsize=1024)  # asked at every request; parsing an address was 6% of its event-loop time
def is_loopback(host):
    """localhost, a *.localhost name (RFC 6761: always loopback) or an address in 127.0.0.0/8 or ::1."""
    host = host.lower().strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin(text):
    """'scheme://host[:port]' in the form a browser sends it (lowercase, no default port), or '*'."""
    if text == "*":
        return text
    parts = urlsplit(text.strip().lower())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path.strip("/") or parts.query or port == -1:
        raise ValueError(f"{text!r} is not an origin: scheme://host[:port] (http or https), or *")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, DEFAULT_PORTS[parts.scheme]) else "")


def host_name(host_header):
    """The Host header without its port: 'example.com:8000' → 'example.com', '[::1]:8000' → '::1'."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0].lower()
    return host_header.partition(":")[0].lower()


def openai_error(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def digest(key):
    """Keys are compared as SHA-256 digests: equal lengths, so the comparison's time tells nothing."""
    return hashlib.sha256(key.encode()).digest()


class Refusal(Exception):
    """A request answered with an OpenAI error, and its connection closed (the rest of its body unread)."""

    def __init__(self, status, message, code, headers=()):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, [*headers, (b"connection", b"close")]


class Guard:
    """The checks above in front of `app`. `public_paths` need no key: exact paths (a prefix would
    open what lies below it), for what a browser loads by itself, like /health or a static page;
    never an API route."""

    def __init__(self, app, options, public_paths=frozenset()):
        self.app, self.options, self.public_paths = app, options, frozenset(public_paths)
        self.key_digests = [digest(key) for key in options.api_keys]
        self.checks_host = is_loopback(options.bind_host) or bool(options.allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{uuid.uuid4().hex}"
        scope["state"] = {**scope.get("state", {}), "request_id": request_id}  # for the app's ids
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        extra = [(b"x-request-id", request_id.encode()), *self.cors_headers(headers.get("origin"))]
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            self.check_sender(scope, headers)
            if scope["method"] == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers:
                await respond(send_with_headers, 204, None, preflight_headers(headers))  # it carries no key
                return
            self.check_request(scope, headers)
            if scope["method"] not in BODYLESS_METHODS:
                body = await read_body(receive, self.options.max_body_bytes)
                if body is None:  # the client left
                    return
                if len(body) > self.options.max_body_bytes:
                    raise self.too_large()
                receive = replay(body, receive)
            await self.app(scope, receive, send_with_headers)
        except Refusal as refusal:
            await respond(send_with_headers, refusal.status, openai_error(str(refusal), code=refusal.code),
                          refusal.headers)
        except Exception:
            if started:
                raise  # too late for a 500: the server cuts the response short
            log.exception("request %s (%s %s) failed", request_id, scope["method"], scope["path"])
            message = f"internal server error (request id {request_id})"
            await respond(send_with_headers, 500, openai_error(message, "server_error"))

    def check_sender(self, scope, headers):
        """Refuse a request that a foreign page sent: through its DNS name (Host), or from it (Origin)."""
        host = headers.get("host")
        if host is not None and self.checks_host and not self.allowed_host(host_name(host)):
            raise Refusal(403, f"Host {host!r} is not allowed: not a loopback name nor in --allowed-hosts",
                          "host_not_allowed")
        request_origin = headers.get("origin")
        if request_origin is not None and not (self.allowed_origin(request_origin)
                                               or self.own_origin(request_origin, scope["scheme"], host)):
            raise Refusal(403, f"Origin {request_origin!r} is not allowed (--allowed-origins)", "origin_not_allowed")

    def check_request(self, scope, headers):
        """Refuse a request without a key, or with a body that is not JSON or is too large."""
        if self.key_digests and scope["path"] not in self.public_paths and not self.authorized(headers):
            raise Refusal(401, "invalid API key" if "authorization" in headers else
                          "no API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key",
                          [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in BODYLESS_METHODS:
            media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                raise Refusal(415, f"Content-Type must be application/json, got {media_type or 'none'!r}",
                              "unsupported_media_type")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.options.max_body_bytes:
            raise self.too_large()

    def too_large(self):
        limit = self.options.max_body_bytes
        return Refusal(413, f"the request body is over {limit} bytes (--max-body-bytes)", "request_too_large")

    def allowed_host(self, name):
        return is_loopback(name) or name in self.options.allowed_hosts or "*" in self.options.allowed_hosts

    def allowed_origin(self, request_origin):
        allowed = self.options.allowed_origins
        return "*" in allowed or request_origin.lower() in allowed

    @staticmethod
    def own_origin(request_origin, scheme, host):
        """Whether the request comes from a page this server served (same scheme, host and port)."""
        try:
            return host is not None and origin(request_origin) == origin(f"{scheme}://{host}")
        except ValueError:  # "null", or garbage
            return False

    def cors_headers(self, request_origin):
        if request_origin is None or not self.allowed_origin(request_origin):
            return []
        return [(b"access-control-allow-origin", request_origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", EXPOSED_HEADERS)]

    def authorized(self, headers):
        scheme, _, key = headers.get("authorization", "").partition(" ")
        given = digest(key.strip())
        matches = [hmac.compare_digest(given, key_digest) for key_digest in self.key_digests]  # all, not any()
        return scheme.lower() == "bearer" and any(matches)


def preflight_headers(headers):
    """The answer to an allowed origin's preflight: the methods, the headers it asked for, for 10 min."""
    return [(b"access-control-allow-methods", b"GET, POST"), (b"access-control-max-age", b"600"),
            (b"access-control-allow-headers", headers.get("access-control-request-headers", "").encode("latin-1"))]


async def read_body(receive, limit):
    """The request body as it arrives, until it ends or passes `limit` bytes (then read no further);
    None if the client left first."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit or not message.get("more_body", False):
            return bytes(body)


def replay(body, receive):
    """A receive that hands the app `body` (already read), then whatever the server says next."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again():
        return pending.pop() if pending else await receive()
    return receive_again


async def respond(send, status, body, headers=()):
    """A whole response, JSON when `body` is not None."""
    content = b"" if body is None else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    kind = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())] if content else []
    await send({"type": "http.response.start", "status": status, "headers": [*kind, *headers]})
    await send({"type": "http.response.body", "body": content})
