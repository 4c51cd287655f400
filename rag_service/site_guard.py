"""What keeps other websites from using an instance that has no API key.

Without ``RAG_API_KEY`` anyone who can reach the service may use it; a browser on the same
machine reaches it too, on behalf of any page it shows. Two ways in are closed here, as
Jupyter and Ollama close them:

* **Cross-site requests.** A page elsewhere can make the browser POST to the service (a
  form, or ``fetch`` with a "simple" content type, which needs no CORS preflight). Browsers
  name the page's origin in the ``Origin`` header of such requests; one that is not the
  service's own origin (its scheme-less ``host:port`` is not the ``Host`` the request was
  sent to), nor a host listed in ``RAG_ALLOWED_HOSTS``, is refused with 403. Clients that are
  not browsers (the CLI, the openai and LangChain clients, curl) send no ``Origin``; the
  playground is served by the service itself, so its requests are same-origin.
* **DNS rebinding.** A page on ``evil.example`` can point that name at 127.0.0.1 and then
  read the service as if it were its own origin; the browser then sends ``Host:
  evil.example``. The ``Host`` header must name the service the way it is bound: a
  loopback name or address when it listens on loopback (``localhost``, ``*.localhost``,
  127.0.0.0/8, ``::1``); the address it is bound to; when it listens on every address
  (``0.0.0.0``, ``::``), any IP address (rebinding needs a name), the loopback names and
  this machine's host name. Other names must be listed in ``RAG_ALLOWED_HOSTS``
  (comma-separated; ``.example.com`` also allows its subdomains; ``*`` allows any host).

JSON routes also refuse a body whose ``Content-Type`` is not JSON (415,
:mod:`rag_service.request_body`), with or without a key, so a form cannot post JSON.
With ``RAG_API_KEY`` set neither check here applies: a browser cannot add the
``Authorization`` header to a cross-site request without the service's consent (CORS).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from litestar.types import ASGIApp, Receive, Scope, Send

from rag_service.errors import error_body
from rag_service.settings import Settings

__all__ = ["HostRule", "site_guard"]

_WILDCARD = {"0.0.0.0", "::", ""}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _hostname(netloc: str) -> str:
    """The host of ``host[:port]`` (``[v6]:port`` too), lower-cased, without a final dot."""
    host = urlsplit(f"//{netloc}").hostname or ""
    return host.rstrip(".").lower()


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class HostRule:
    """Which ``Host`` names (and origins) a service bound to ``settings.host`` answers."""

    def __init__(self, settings: Settings) -> None:
        bind = settings.host.strip("[]").lower()
        self.any_host = False
        self.exact: set[str] = set()
        self.suffixes: list[str] = []
        for entry in (e.strip().lower() for e in settings.allowed_hosts.split(",")):
            if entry == "*":
                self.any_host = True
            elif entry.startswith("."):
                self.suffixes.append(entry)
            elif entry:
                self.exact.add(entry.rstrip("."))
        self.wildcard = bind in _WILDCARD
        self.bind = bind
        self.bind_ip = _ip(bind)
        self.loopback = settings.is_loopback or (
            self.bind_ip is not None and self.bind_ip.is_loopback
        )
        self.local_names: set[str] = set()
        if self.wildcard:
            self.local_names = {socket.gethostname().lower(), socket.getfqdn().lower()}

    def listed(self, host: str) -> bool:
        """Named in RAG_ALLOWED_HOSTS."""
        return (
            self.any_host
            or host in self.exact
            or any(host.endswith(s) or host == s[1:] for s in self.suffixes)
        )

    def allows(self, host: str) -> bool:
        """Whether a request with ``Host: host`` (no port) is served."""
        if self.listed(host):
            return True
        ip = _ip(host)
        local_name = host in _LOOPBACK_NAMES or host.endswith(".localhost")
        if self.wildcard:
            return ip is not None or local_name or host in self.local_names
        if self.loopback and (local_name or (ip is not None and ip.is_loopback)):
            return True
        return host == self.bind or (ip is not None and ip == self.bind_ip)


async def _refuse(send: Send, message: str, code: str) -> None:
    body = json.dumps(error_body(message, "permission_error", None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def site_guard(settings: Settings) -> Callable[[ASGIApp], ASGIApp]:
    """The middleware factory (``Litestar(middleware=[...])``) for ``settings``."""
    rule = HostRule(settings)

    def middleware(app: ASGIApp) -> ASGIApp:
        if settings.api_key is not None:
            return app

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":  # the service serves no websockets
                await app(scope, receive, send)
                return
            headers = dict(scope["headers"])
            host_header = headers.get(b"host", b"").decode("latin-1")
            host = _hostname(host_header)
            problem: tuple[str, str] | None = None
            if not rule.allows(host):
                problem = (
                    f"Host {host_header[:100]!r} is not a name this service is served as; "
                    "list it in RAG_ALLOWED_HOSTS (or set RAG_API_KEY)",
                    "unknown_host",
                )
            elif (origin := headers.get(b"origin")) is not None:
                text = origin.decode("latin-1")
                netloc = urlsplit(text).netloc.lower()
                if netloc != host_header.lower() and not rule.listed(_hostname(netloc)):
                    problem = (
                        f"requests from other websites (Origin {text[:100]!r}) are refused "
                        "by a service without RAG_API_KEY; list the site's host in "
                        "RAG_ALLOWED_HOSTS to allow it",
                        "foreign_origin",
                    )
            if problem is None:
                await app(scope, receive, send)
                return
            await _refuse(send, *problem)

        return guarded

    return middleware
