"""Datasets fetched from an http(s) URL, guarded against being turned on the server's own network.

A URL from a client makes the server open a connection on the client's behalf, from inside the
cluster. So every hop is vetted before it is opened: the scheme (https; http only when a
setting allows it), then every address the host resolves to, refused when any of them is
loopback, private, link-local (169.254.169.254, the cloud metadata service), reserved,
multicast, unspecified or otherwise not global, including IPv4 addresses carried inside IPv6
ones (mapped, 6to4, Teredo, NAT64). Redirects are followed here, one at a time, each vetted like
the first. The connection goes to the vetted address itself, with the URL's host name kept for
the Host header and for TLS (SNI and certificate checks), so a second DNS answer cannot swap in
another address between the check and the connection. Proxies from the environment are
ignored for the same reason. The body is held to the upload limit.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx

from jobs.errors import DatasetInvalid, TooLarge, UrlRefused
from jobs.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECTS = {301, 302, 303, 307, 308}
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
CHUNK_BYTES = 1024 * 1024
NAT64 = ipaddress.ip_network("64:ff9b::/96")
FIELD = "url"
KINDS = ("loopback", "link_local", "unspecified", "multicast", "reserved", "private")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Hop:
    """A URL that passed the guard, and the address vetted for it."""

    url: httpx.URL
    address: str

    def request(self) -> httpx.Request:
        """A GET to the vetted address that still names the URL's host to the server."""
        host = self.url.host
        request = httpx.Request(
            "GET",
            self.url.copy_with(host=self.address),
            headers={"Host": self.url.netloc.decode("ascii")},
        )
        if self.url.scheme == "https":
            request.extensions["sni_hostname"] = host
        return request


def embedded_ipv4(address: Address) -> list[Address]:
    """The address itself and any IPv4 address an IPv6 one carries."""
    found: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.append(address.teredo[1])
        if address in NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def refusal(address: Address) -> str | None:
    """Why a connection to ``address`` is refused, or None when it is a public address."""
    for candidate in reversed(embedded_ipv4(address)):
        kind = next(
            (kind.replace("_", "-") for kind in KINDS if getattr(candidate, f"is_{kind}")),
            None if candidate.is_global else "non-public",
        )
        if kind is None:
            continue
        described = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"
        if candidate == address:
            return f"{address} is {described}"
        return f"{address} carries {candidate}, {described}"
    return None


def resolve(host: str, port: int) -> list[Address]:
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefused(f"url host {host!r} does not resolve: {exc}", field=FIELD) from None
    # getaddrinfo may append a scope to link-local IPv6 answers ("fe80::1%eth0").
    return [ipaddress.ip_address(str(answer[4][0]).split("%")[0]) for answer in answers]


def vet(raw: str, settings: Settings) -> Hop:
    """Check one URL against the guard and pick the address to connect to."""
    try:
        url = httpx.URL(raw)
    except httpx.InvalidURL as exc:
        raise UrlRefused(f"url {raw!r} is not a URL: {exc}", field=FIELD) from None
    schemes = {"https", "http"} if settings.remote_data_allow_http else {"https"}
    if url.scheme not in schemes:
        raise UrlRefused(
            f"url {raw!r} refused: scheme {url.scheme!r} is not allowed; use "
            f"{' or '.join(sorted(schemes))}",
            field=FIELD,
        )
    if not url.host:
        raise UrlRefused(f"url {raw!r} refused: it names no host", field=FIELD)
    if url.userinfo:
        raise UrlRefused(f"url {raw!r} refused: credentials in URLs are not sent", field=FIELD)
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = resolve(url.host, port)
    if f"{url.host}:{port}" not in settings.remote_data_allowed_hosts:
        for address in addresses:
            reason = refusal(address)
            if reason is not None:
                raise UrlRefused(f"url {raw!r} refused: {reason}", field=FIELD)
    return Hop(url, str(addresses[0]))


def fetch(raw: str, settings: Settings, target: Path) -> str:
    """Download ``raw`` into ``target`` through the guard; return the file name the URL gives."""
    url = raw
    with httpx.Client(timeout=TIMEOUT, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            hop = vet(url, settings)
            try:
                response = client.send(hop.request(), stream=True)
            except httpx.HTTPError as exc:
                raise DatasetInvalid(
                    f"url {url!r} could not be fetched: {type(exc).__name__}: {exc}", field=FIELD
                ) from None
            try:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    url = str(hop.url.join(response.headers["location"]))
                    log.info("dataset import: %s redirects to %s", hop.url, url)
                    continue
                if response.status_code != 200:
                    raise DatasetInvalid(
                        f"url {url!r} answered HTTP {response.status_code}", field=FIELD
                    )
                copy_limited(response, target, settings.max_upload_bytes)
                return PurePosixPath(hop.url.path).name or "download"
            finally:
                response.close()
    raise UrlRefused(f"url {raw!r} refused: more than {MAX_REDIRECTS} redirects", field=FIELD)


def copy_limited(response: httpx.Response, target: Path, limit: int) -> None:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"url: the file is {declared} bytes; the limit is {limit}", field=FIELD)
    size = 0
    with target.open("wb") as out:
        for chunk in response.iter_bytes(CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"url: the file is over the limit of {limit} bytes", field=FIELD)
            out.write(chunk)
