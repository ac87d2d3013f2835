"""One login for the page, the APIs and every internal route, and the HTTP hardening around them.

- API clients (A1111's `/sdapi/v1`, the native `/api/v1/jobs`, `/docs`, `/outputs/`) send HTTP Basic
  credentials, as webuiapi's `set_auth` does. A browser session cookie is *not* accepted there, so a
  page on another site cannot make a logged-in browser call the API.
- The Gradio page keeps its own login form (the same check, passed to `mount_gradio_app(auth=...)`).
  Gradio leaves some of its routes open (heartbeat, cancel, stream, ...); the middleware closes them:
  everything but the login page and its static files needs the Gradio session cookie or Basic.
- Every request's `Host` must name this server: a loopback name or address, a name given with
  `--allowed-hosts`, or (with `--listen`) one of the machine's own names and addresses. Anything else
  gets 403 before any route, page or Gradio internal runs: that is what stops DNS rebinding, where a web
  page makes its own domain resolve to 127.0.0.1 and so becomes "same origin" with a local server.
- `X-Forwarded-Host`, `-Proto` and `-For` are honoured only from the proxies named with
  `--forwarded-allow-ips`, and then must name an allowed host too; from anyone else they are removed
  before Gradio or a route can read them.
- Mutating requests (POST, PUT, PATCH, DELETE) and WebSocket upgrades that carry an `Origin` header must
  come from the allowed host they address (or an origin allowed with `--cors-allow-origins`): cross-site
  requests get 403, with or without logins, so a web page cannot drive a local instance either.
- Admins (`--admin-users a,b`, names from the logins) may see and cancel every user's jobs and are
  the only ones who may change settings once at least one admin is named.

Passwords are compared with `hmac.compare_digest`, against every login, so the time taken says
nothing about which user names exist.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping
from urllib.parse import urlsplit

log = logging.getLogger("athanor.auth")

LOCAL_OWNER = "local"  # the owner of every job when no logins are configured
USER_STATE_KEY = "athanor_user"  # where the middleware leaves the authenticated user name in scope["state"]
REALM = "Athanor"

# Paths served to API clients: Basic credentials only.
API_PREFIXES = ("/sdapi/", "/api/v1/", "/outputs/")
API_EXACT = frozenset({"/sdapi", "/api/v1", "/outputs", "/docs", "/docs/oauth2-redirect", "/openapi.json"})

# What Gradio's login page needs before anyone is logged in (the page itself, its scripts and styles).
PAGE_PUBLIC_EXACT = frozenset({"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css",
                               "/gradio_api/theme.css", "/robots.txt", "/manifest.json",
                               "/gradio_api/login_check", "/gradio_api/login_check/"})
PAGE_PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon", "/gradio_api/pwa_icon")

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class AuthConfig:
    """The logins (`--auth`, `--auth-file`) and the admins among them (`--admin-users`)."""

    logins: Mapping[str, str] = field(default_factory=dict)
    admins: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return bool(self.logins)

    def verify(self, username: str, password: str) -> bool:
        """True when `username:password` is one of the logins (constant time in the names and passwords)."""
        if not isinstance(username, str) or not isinstance(password, str):
            return False
        given_user, given_password = username.encode("utf-8"), password.encode("utf-8")
        found = False
        for user, secret in self.logins.items():
            same_user = hmac.compare_digest(user.encode("utf-8"), given_user)
            same_password = hmac.compare_digest(secret.encode("utf-8"), given_password)
            found |= same_user and same_password
        return found

    def is_admin(self, username: str | None) -> bool:
        """Without logins the single local user is the admin; with logins only the named admins are."""
        if not self.enabled:
            return True
        return username is not None and username in self.admins

    def gradio_auth(self) -> Callable[[str, str], bool] | None:
        """What `gr.mount_gradio_app(auth=...)` takes: the same check as the API, or None without logins."""
        return self.verify if self.enabled else None


def parse_admin_users(text: str | None, logins: Mapping[str, str]) -> frozenset[str]:
    """`--admin-users a,b` -> {"a", "b"}; every name must be one of the logins."""
    names = frozenset(n.strip() for n in (text or "").split(",") if n.strip())
    if names and not logins:
        raise ValueError("--admin-users needs logins: add --auth user:password (or --auth-file FILE)")
    unknown = sorted(names - set(logins))
    if unknown:
        raise ValueError(f"--admin-users names {', '.join(unknown)}, which is not among the --auth logins")
    return names


def auth_config_from_args(args: Any, logins: Mapping[str, str]) -> AuthConfig:
    """The AuthConfig for parsed flags and logins; ValueError with the flag to fix when they disagree."""
    return AuthConfig(dict(logins), parse_admin_users(getattr(args, "admin_users", None), logins))


def owner_for(username: str | None) -> str:
    """The job owner for an authenticated user (the same form the Gradio page uses), or "local"."""
    return f"user:{username}" if username else LOCAL_OWNER


def parse_basic_authorization(header: str | None) -> tuple[str, str] | None:
    """`Basic base64(user:pass)` -> (user, pass); None when absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, sep, password = text.partition(":")
    if not sep:
        return None
    return user, password


def is_api_path(path: str) -> bool:
    return path in API_EXACT or path.startswith(API_PREFIXES)


def is_public_page_path(path: str) -> bool:
    return path in PAGE_PUBLIC_EXACT or path.startswith(PAGE_PUBLIC_PREFIXES)


def origin_allowed(origin: str, host: str | None, allowed: Iterable[str] = (), allowed_regex: str | None = None) -> bool:
    """Whether a mutating request from `origin` may reach a server addressed as `host` (the Host header)."""
    origin = origin.strip()
    if origin in allowed or "*" in allowed:
        return True
    if allowed_regex and re.fullmatch(allowed_regex, origin):
        return True
    if origin.lower() == "null" or not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default_port = 443 if parts.scheme == "https" else 80
    return _host_and_port(parts.netloc, default_port) == _host_and_port(host, default_port)


def _host_and_port(netloc: str, default_port: int) -> tuple[str, int]:
    netloc = netloc.strip().lower()
    if netloc.startswith("["):  # IPv6 literal: [::1]:7860
        end = netloc.find("]")
        hostname, rest = netloc[:end + 1], netloc[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        hostname, _, port = netloc.partition(":")
    return hostname, int(port) if port.isdigit() else default_port


def cookies_from_header(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out[name] = value
    return out


def gradio_session_user(server: Any, cookies: Mapping[str, str]) -> str | None:
    """The user logged into the Gradio page with these cookies, if any (Gradio keeps tokens in its app)."""
    for route in getattr(server, "routes", ()):
        sub = getattr(route, "app", None)
        tokens = getattr(sub, "tokens", None)
        cookie_id = getattr(sub, "cookie_id", None)
        if isinstance(tokens, dict) and cookie_id:
            for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
                token = cookies.get(name)
                if token and token in tokens:
                    return tokens[token]
    return None


# ---------------------------------------------------------------------------------------------
# Which Host names this server answers to (DNS rebinding), and which peers may forward

def split_host(netloc: str) -> str:
    """`Host` header or URL netloc -> the bare lower-case name or address: "[::1]:7860" -> "::1"."""
    netloc = (netloc or "").strip().lower().rstrip(".")
    if netloc.startswith("["):
        end = netloc.find("]")
        return netloc[1:end] if end > 0 else netloc
    if netloc.count(":") > 1:  # a bare IPv6 address without brackets
        return netloc
    name = netloc.partition(":")[0]
    return name.rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return None


def is_loopback_host(name: str) -> bool:
    """localhost, *.localhost (browsers resolve those to loopback themselves), 127.0.0.0/8, ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = _ip(name)
    if address is None:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def machine_hosts() -> set[str]:
    """This machine's own names and interface addresses (what LAN users type to reach it with --listen).
    Read locally: no DNS lookup is made."""
    import socket

    names: set[str] = set()
    try:
        hostname = socket.gethostname().lower()
        if hostname:
            short = hostname.split(".")[0]
            names |= {hostname, short, f"{short}.local"}  # .local: the mDNS name LAN users often type
    except OSError:
        pass
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            for entry in addresses:
                if entry.family in (socket.AF_INET, socket.AF_INET6) and entry.address:
                    names.add(entry.address.split("%")[0].lower())
    except Exception:  # noqa: BLE001 - without psutil only the names and loopback are allowed
        pass
    return names


@dataclass(frozen=True)
class HostPolicy:
    """The Host names allowed (`--allowed-hosts`, with `--listen` the machine's own) and the proxies trusted
    with X-Forwarded-* headers (`--forwarded-allow-ips`)."""

    names: frozenset[str] = frozenset()  # exact names/addresses, lower case, no port
    suffixes: tuple[str, ...] = ()  # ".example.com" allows every sub-domain of example.com and itself
    any_host: bool = False  # --allowed-hosts '*': no Host check (only behind a proxy that checks it)
    proxies: tuple[Any, ...] = ()  # ip networks
    any_proxy: bool = False

    def allows(self, host_header: str | None) -> bool:
        if host_header is None:
            return True  # HTTP/1.0 clients may omit it; browsers never do, so rebinding cannot
        if self.any_host:
            return True
        name = split_host(host_header)
        if not name:
            return False
        if is_loopback_host(name) or name in self.names:
            return True
        address = _ip(name)
        if address is not None:
            return str(address) in self.names
        return any(name == suffix[1:] or name.endswith(suffix) for suffix in self.suffixes)

    def trusts(self, peer: str | None) -> bool:
        if self.any_proxy:
            return True
        address = _ip(peer or "")
        return address is not None and any(address in network for network in self.proxies)

    @classmethod
    def from_args(cls, args: Any) -> "HostPolicy":
        """ValueError naming the flag for a malformed entry."""
        names: set[str] = set()
        suffixes: list[str] = []
        any_host = False
        for item in (getattr(args, "allowed_hosts", None) or "").split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item == "*":
                any_host = True
            elif item.startswith("."):
                suffixes.append(item.rstrip("."))
            else:
                name = split_host(item)
                if not name or "/" in name or " " in name:
                    raise ValueError(f"--allowed-hosts: {item!r} is not a host name or address")
                address = _ip(name)
                names.add(str(address) if address is not None else name)
        if getattr(args, "listen", False):
            names |= machine_hosts()
        proxies: list[Any] = []
        any_proxy = False
        for item in (getattr(args, "forwarded_allow_ips", None) or "").split(","):
            item = item.strip()
            if not item:
                continue
            if item == "*":
                any_proxy = True
                continue
            try:
                proxies.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"--forwarded-allow-ips: {item!r} is not an IP address or network") from None
        return cls(frozenset(names), tuple(suffixes), any_host, tuple(proxies), any_proxy)


_FORWARDED_HEADERS = (b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-for", b"x-forwarded-port",
                      b"x-forwarded-prefix", b"forwarded", b"x-real-ip")


def _strip_forwarded(scope: Scope) -> None:
    scope["headers"] = [(k, v) for k, v in scope.get("headers", ()) if k.lower() not in _FORWARDED_HEADERS]


def _apply_forwarded(scope: Scope, headers: Mapping[str, str], policy: HostPolicy) -> None:
    """A trusted proxy's X-Forwarded-Proto and -For become the request's scheme and client (uvicorn's
    own proxy handling is off: it would trust 127.0.0.1 by default, i.e. any local browser page)."""
    proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    if proto in ("http", "https"):
        scope["scheme"] = ("wss" if proto == "https" else "ws") if scope["type"] == "websocket" else proto
    hops = [h.strip() for h in headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):  # the nearest hop the trusted proxies did not add is the client
        if not policy.trusts(hop):
            scope["client"] = (hop, 0)
            break
    else:
        if hops:
            scope["client"] = (hops[0], 0)


# ---------------------------------------------------------------------------------------------
# ASGI middleware

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


def _error_body(error: str, detail: Any) -> bytes:
    # A1111's error shape: {error, detail, body, errors}
    message = detail if isinstance(detail, str) else json.dumps(detail)
    return json.dumps({"error": error, "detail": detail, "body": "", "errors": message}).encode("utf-8")


async def _send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class SecurityPolicy:
    """Everything the middleware decides on; built by `create_server` from the flags."""

    auth: AuthConfig
    hosts: HostPolicy = HostPolicy()
    page_mounted: bool = True
    cors_origins: tuple[str, ...] = ()
    cors_origin_regex: str | None = None
    max_body_bytes: int = 256 * 1024 * 1024


class SecurityMiddleware:
    """Logins, same-origin check for mutating requests, request size cap and `X-Process-Time`."""

    def __init__(self, app: Callable, *, policy: SecurityPolicy, server: Any = None):
        self.app = app
        self.policy = policy
        self.server = server  # the FastAPI app Gradio is mounted on (to read Gradio's session tokens)

    def _authenticate(self, path: str, headers: Mapping[str, str]) -> tuple[bool, str | None]:
        """(allowed, user) for a request."""
        auth = self.policy.auth
        if not auth.enabled:
            return True, None
        creds = parse_basic_authorization(headers.get("authorization"))
        if creds is not None and auth.verify(*creds):
            return True, creds[0]
        if is_api_path(path) or not self.policy.page_mounted:
            return False, None
        if is_public_page_path(path):
            return True, None
        user = gradio_session_user(self.server, cookies_from_header(headers.get("cookie")))
        return (user is not None and user in auth.logins), user

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        path = scope.get("path", "")
        hosts = self.policy.hosts
        peer = (scope.get("client") or (None, None))[0]
        addressed = [headers.get("host")]
        if hosts.trusts(peer):
            forwarded_host = headers.get("x-forwarded-host", "").split(",")[0].strip()
            if forwarded_host:
                addressed.append(forwarded_host)
            _apply_forwarded(scope, headers, hosts)
        else:
            _strip_forwarded(scope)  # nobody else may tell Gradio or a route which host or scheme this is
        refused = [h for h in addressed if not hosts.allows(h)]
        if refused:
            refused_host = refused[0]
            log.warning("Refused a request for host %r from %s (not an allowed host; see --allowed-hosts)",
                        refused_host, peer)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _send_json(send, 403, _error_body(
                    "Forbidden", f"Host {refused_host!r} is not this server's name. If you reach Athanor under "
                                 "this name, start it with --allowed-hosts NAME."))
            return

        allowed, user = self._authenticate(path, headers)
        scope.setdefault("state", {})[USER_STATE_KEY] = user

        origin = headers.get("origin")
        foreign = origin is not None and not any(
            origin_allowed(origin, host, self.policy.cors_origins, self.policy.cors_origin_regex)
            for host in addressed if host)

        if scope["type"] == "websocket":
            # browsers send Origin with every WebSocket upgrade and no preflight stops a cross-site one
            if not allowed or foreign:
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return

        method = scope.get("method", "GET").upper()
        if not allowed:
            api = is_api_path(path) or not self.policy.page_mounted
            # API clients are asked for Basic credentials; the page gets Gradio's own "not logged in" answer
            body = (_error_body("Unauthorized", "Incorrect username or password") if api else
                    json.dumps({"detail": {"error": "Not authenticated", "auth_message": None}}).encode())
            extra = [(b"www-authenticate", f'Basic realm="{REALM}"'.encode())] if api else []
            await _send_json(send, 401, body, extra)
            return

        if method in MUTATING_METHODS and foreign:
            await _send_json(send, 403, _error_body(
                "Forbidden", f"Cross-site request refused: origin {origin!r} is not this server"))
            return

        declared = headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.policy.max_body_bytes
            except ValueError:
                too_big = True
            if too_big:
                await _send_json(send, 413, _error_body(
                    "PayloadTooLarge", f"The request body is larger than {self.policy.max_body_bytes} bytes"))
                return

        started = time.perf_counter()
        received = 0
        response_started = False
        limit = self.policy.max_body_bytes

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        async def timed_send(message: dict) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                duration = f"{time.perf_counter() - started:.4f}".encode()
                message = dict(message)
                headers_out = list(message.get("headers", []))
                if foreign:
                    # no CORS for origins not allowed with --cors-allow-origins (Gradio grants localhost pages)
                    headers_out = [(k, v) for k, v in headers_out if not k.lower().startswith(b"access-control-")]
                message["headers"] = [*headers_out, (b"x-process-time", duration)]
            await send(message)

        try:
            await self.app(scope, counting_receive, timed_send)
        except _BodyTooLarge:
            if not response_started:
                await _send_json(send, 413, _error_body(
                    "PayloadTooLarge", f"The request body is larger than {limit} bytes"))


def install_security(server: Any, args: Any, logins: Mapping[str, str], *, page_mounted: bool,
                     max_upload_base64: int = 28 * 1024 * 1024) -> AuthConfig:
    """Put the Host check, the login check, the same-origin check and the body size cap in front of every
    route of `server`, and CORS headers only for `--cors-allow-origins`. `max_upload_base64` is the longest
    image one field may carry (a body may hold a few). Returns the AuthConfig (for Gradio's login)."""
    auth = auth_config_from_args(args, logins)
    origins = tuple(o.strip() for o in (getattr(args, "cors_allow_origins", None) or "").split(",") if o.strip())
    origin_regex = getattr(args, "cors_allow_origins_regex", None) or None
    policy = SecurityPolicy(auth=auth, hosts=HostPolicy.from_args(args), page_mounted=page_mounted,
                            cors_origins=origins,
                            cors_origin_regex=origin_regex,
                            max_body_bytes=max(64 * 1024 * 1024, 4 * max_upload_base64 + 1024 * 1024))
    server.add_middleware(SecurityMiddleware, policy=policy, server=server)
    if origins or origin_regex:
        from starlette.middleware.cors import CORSMiddleware

        # added last, so it runs first: preflight OPTIONS requests carry no credentials
        server.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_origin_regex=origin_regex,
                              allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    return auth


def check_tls_args(args: Any) -> None:
    """ValueError unless --tls-keyfile and --tls-certfile are given together and both files exist."""
    key, cert = getattr(args, "tls_keyfile", None), getattr(args, "tls_certfile", None)
    if bool(key) != bool(cert):
        raise ValueError("--tls-keyfile and --tls-certfile go together: give both, or neither")
    for flag, path in (("--tls-keyfile", key), ("--tls-certfile", cert)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
