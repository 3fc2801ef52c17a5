"""Which webhook URLs the service will POST to (the SSRF guard), checked at submit and at delivery.

A target is refused when its scheme is not http(s), its port is not allowed (``VITQ_WEBHOOK_PORTS``), it
carries credentials, or any address its host resolves to is loopback, private (RFC 1918, 100.64/10),
link-local (169.254/16: cloud metadata; fe80::/10), multicast, unspecified, reserved, IPv6 unique-local
(fc00::/7) or site-local, or an IPv4-mapped/6to4/NAT64 form of one of these. ``VITQ_WEBHOOK_ALLOW_PRIVATE``
lets an operator reach internal receivers.

At delivery the host is resolved again and the connection goes to the address that was checked (the
request line names the IP, ``Host`` and TLS SNI/certificate checks keep the name), so a name cannot
resolve to a public address for the check and to an internal one for the connection (DNS rebinding).
Redirects are never followed. Name resolution is :func:`resolve` (``socket.getaddrinfo``); the tests
replace it in-process, so no refused target is ever contacted.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from service.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_EXTRA_BLOCKED = [
    ipaddress.ip_network("100.64.0.0/10"),  # carrier-grade NAT (shared address space)
    ipaddress.ip_network("192.0.0.0/24"),  # IETF protocol assignments
    ipaddress.ip_network("198.18.0.0/15"),  # benchmarking
    ipaddress.ip_network("fec0::/10"),  # deprecated site-local
]


class WebhookTargetError(ValueError):
    """The URL may not be used as a webhook target; the message says why."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    """The name (or literal address) in the URL: the ``Host`` header and the TLS server name."""
    port: int
    address: IPAddress
    """The checked address the connection goes to."""
    path: str

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the name."""
        literal = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the one place the guard asks DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in ipaddress.ip_network("64:ff9b::/96"):  # NAT64
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def internal_reason(address: IPAddress) -> str | None:
    """Why ``address`` is internal (``None``: a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None:
            reason = internal_reason(embedded)
            return f"{reason}: {embedded}, embedded in an IPv6 address" if reason else None
    checks = [
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local (cloud metadata lives at 169.254.169.254)"),
        ("is_multicast", "multicast"),
    ]
    for attribute, reason in checks:
        if getattr(address, attribute):
            return reason
    if isinstance(address, ipaddress.IPv6Address) and address in ipaddress.ip_network("fc00::/7"):
        return "IPv6 unique-local"
    if any(address in net for net in _EXTRA_BLOCKED if net.version == address.version):
        return "private or reserved"
    if address.is_private or address.is_reserved or not address.is_global:
        return "private or reserved"
    return None


def allowed_ports(spec: str) -> set[int] | None:
    """``VITQ_WEBHOOK_PORTS`` → the set of ports (``None``: any)."""
    spec = spec.strip()
    if spec == "*":
        return None
    ports: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


def parse(url: str, settings: Settings) -> tuple[str, str, int, str]:
    """Scheme, host, port and path of an acceptable URL, before any resolution."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookTargetError(f"webhook_url is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookTargetError(f"webhook_url must be http or https, not {scheme or 'no scheme'!r}")
    if parts.username is not None or parts.password is not None:
        raise WebhookTargetError("webhook_url must not carry credentials (user:password@)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookTargetError("webhook_url has no host")
    port = port or (443 if scheme == "https" else 80)
    ports = allowed_ports(settings.webhook_ports)
    if ports is not None and port not in ports:
        raise WebhookTargetError(
            f"webhook_url port {port} is not allowed (allowed: {settings.webhook_ports}; VITQ_WEBHOOK_PORTS)"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path


def check(url: str, settings: Settings) -> Target:
    """Resolve and check ``url``; the :class:`Target` to connect to, or :class:`WebhookTargetError`."""
    scheme, host, port, path = parse(url, settings)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        candidates = [literal]
    else:
        try:
            candidates = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port)]
        except (OSError, UnicodeError) as exc:
            raise WebhookTargetError(f"webhook_url host {host!r} does not resolve: {exc}") from None
        if not candidates:
            raise WebhookTargetError(f"webhook_url host {host!r} does not resolve")
    if not settings.webhook_allow_private:
        for address in candidates:
            reason = internal_reason(address)
            if reason is not None:
                what = str(address) if literal is not None else f"{host!r} resolves to {address}, which"
                raise WebhookTargetError(
                    f"webhook_url refused: {what} is an internal address ({reason}); internal targets are not allowed "
                    "(an operator can allow them with VITQ_WEBHOOK_ALLOW_PRIVATE)"
                )
    return Target(scheme=scheme, host=host, port=port, address=candidates[0], path=path)
