"""Point amoCRM's links back at the broker: pure functions over an answer's headers and bytes.

amoCRM writes HAL links (`_links.next.href`, each embedded item's `_links.self.href`) and
`Location` as absolute URLs on its own host. Relayed as they are, a client that follows
`next` calls amoCRM directly, without the broker's token: a 401, and a call the account's
pace never saw. So an `href` (anywhere in a JSON answer) or a `Location` on amoCRM's origin
under /api/v4 is moved onto the address the caller used, with the account prefix it used.

Most answers hold no link at all: a `bytes.find` of amoCRM's host decides that before any
parsing, and an answer with nothing to move keeps its exact bytes. The find is for the host
as amoCRM writes it, lowercase (a host's normal form, RFC 3986 6.2.2.1): a body spelling it
only in capitals is not looked into; lowercasing every body to find one would double the
pre-check's cost. Only the JSON of answers
up to MAX_REWRITE (before and after decoding gzip or deflate) is read; anything larger,
unsized or otherwise encoded streams through untouched, so memory stays bounded.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from broker.server.proxy_rules import API_PREFIX

# The most JSON one answer may hold to have its links moved. amoCRM's pages hold at most
# 250 items: a sandbox leads page of 250 is 80 KB, a real one with custom fields a few
# hundred KB. Larger answers are not lists of links; they stream through untouched.
MAX_REWRITE = 4 << 20
_DEFAULT_PORTS = {"http": 80, "https": 443}
# What a Host header may hold to be written into a link: a name or address, and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_CHARSET = re.compile(r"charset\s*=\s*\"?([^\";\s]+)", re.IGNORECASE)
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


@dataclass(frozen=True)
class Origin:
    """amoCRM's origin as its links may spell it: either scheme, any case, a default port."""

    prefixes: tuple[str, ...]  # lowercase, each up to the path's first '/'
    needle: bytes  # the host as amoCRM writes it (no slash in it: found in `\\/` bodies too)
    span: int  # the longest prefix's length

    @classmethod
    def of(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        host = parts.hostname or ""
        authority = f"[{host}]" if ":" in host else host
        port = _port(parts.scheme, parts.port)
        ports = [f":{port}"] if port is not None else ["", ":80", ":443"]
        spelled = [f"{s}://{authority}{p}/" for s in _DEFAULT_PORTS for p in ports]
        if port is None:  # http on 443 or https on 80 is another origin's port
            spelled.remove(f"http://{authority}:443/")
            spelled.remove(f"https://{authority}:80/")
        return cls(tuple(spelled), host.encode(), max(map(len, spelled)))

    def holds(self, url: str) -> str | None:
        """Return the path-and-after of `url` when it is on this origin under /api/v4."""
        # Prefixes, not urlsplit: a page of 250 leads holds 250 links. The authority ends at
        # the '/' each prefix holds, so neither `host.evil` nor `user@host` slips by.
        head = url[: self.span].lower()
        if not head.startswith(self.prefixes):
            return None
        rest = url[head.index("/", head.index("//") + 2) :]
        return rest if _under_api(rest) else None


def public_base(scheme: str, host: str, public_url: str | None, prefix: str) -> str | None:
    """Say where links must lead: `public_url`, else the scheme and Host the caller used.

    None when the Host header is not a plain host and port: nothing is rewritten then.
    `prefix` is the account's `/a/NAME`, or "" for the default account.
    """
    if public_url is not None:
        return public_url + prefix
    if not _HOST.fullmatch(host):
        return None
    return f"{scheme}://{host}{prefix}"


def rewrite_url(url: str, origin: Origin, base: str) -> str | None:
    """Move one absolute URL on amoCRM's origin onto `base`; None when it is not amoCRM's."""
    rest = origin.holds(url)
    return None if rest is None else base + rest


def rewrite_location(url: str, origin: Origin, base: str) -> str | None:
    """Move a Location onto `base`: absolute on amoCRM's origin, or path-absolute (/api/v4)."""
    if url.startswith("/") and not url.startswith("//"):
        # Relative to amoCRM's URL, which is not the caller's: under /a/NAME it would lead
        # to the default account.
        return base + url if _under_api(url) else None
    return rewrite_url(url, origin, base)


def move_location(
    headers: list[tuple[str, str]], origin: Origin, base: str
) -> list[tuple[str, str]]:
    """Return `headers` with a Location on amoCRM's origin moved onto `base`."""
    moved = []
    for name, value in headers:
        new = rewrite_location(value, origin, base) if name.lower() == "location" else None
        moved.append((name, new or value))
    return moved


def rewrite_links(body: bytes, origin: Origin, base: str) -> bytes | None:
    """Move every `href` string on amoCRM's origin onto `base`; None when nothing moved.

    Malformed JSON (or JSON that would not come back as the same values) moves nothing.
    """
    if body.find(origin.needle) == -1:
        return None
    try:
        doc = json.loads(body, parse_constant=_refuse, parse_float=_finite)
    except (ValueError, RecursionError):
        return None
    moved = False
    stack = [doc]
    while stack:  # not recursive: json.loads takes nesting deeper than Python's stack
        node = stack.pop()
        values = node.values() if type(node) is dict else node
        if type(node) is dict and type(href := node.get("href")) is str:
            new = rewrite_url(href, origin, base)
            if new is not None:
                node["href"], moved = new, True
        # type() over isinstance(): the walk visits every value of a page; this halves it.
        stack.extend(v for v in values if type(v) is dict or type(v) is list)
    if not moved:
        return None
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def rewritable(headers: list[tuple[str, str]]) -> bool:
    """Tell whether an answer with these headers is UTF-8 JSON, in an encoding we can read."""
    content_type = encoding = ""
    for name, value in headers:
        lower = name.lower()
        if lower == "content-type":
            content_type = value
        elif lower == "content-encoding":
            encoding = value.strip().lower()
    if encoding not in ("", "identity") and encoding not in _ENCODINGS:
        return False  # br (no decoder installed), or a list of codings: untouched
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        return False
    charset = _CHARSET.search(params)
    return charset is None or charset.group(1).lower() in ("utf-8", "utf8")


def is_hal(headers: list[tuple[str, str]]) -> bool:
    """Tell whether the answer is a HAL document, as amoCRM types its lists with `_links`."""
    for name, value in headers:
        if name.lower() == "content-type":
            return value.partition(";")[0].strip().lower() == "application/hal+json"
    return False


def rewrite_answer(
    body: bytes, headers: list[tuple[str, str]], origin: Origin, base: str
) -> tuple[bytes, list[tuple[str, str]]] | None:
    """Move the links of a whole JSON answer; None (send it as it came) when nothing moved.

    A gzip or deflate answer is decoded to look inside and, rewritten, goes out uncompressed:
    the hop from the broker to its callers is local, and compressing again would spend the
    event loop's time on every such answer. `Content-Length` is dropped (aiohttp sets it from
    the new body) and a strong ETag becomes weak, as nginx does when it changes the bytes.
    """
    encoding = next((v.strip().lower() for n, v in headers if n.lower() == "content-encoding"), "")
    plain = _decode(body, encoding) if encoding in _ENCODINGS else body
    if plain is None:
        return None
    new = rewrite_links(plain, origin, base)
    if new is None:
        return None
    kept: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if lower in ("content-length", "content-encoding"):
            continue
        if lower == "etag" and not value.startswith("W/"):
            value = "W/" + value
        kept.append((name, value))
    return new, kept


def _decode(body: bytes, encoding: str) -> bytes | None:
    """Inflate at most MAX_REWRITE bytes; None when larger, broken or more than one member."""
    wbits = _ENCODINGS[encoding]
    for bits in (wbits, -zlib.MAX_WBITS) if encoding == "deflate" else (wbits,):
        # Some servers send raw deflate under "deflate": try it when the zlib header is absent.
        inflater = zlib.decompressobj(bits)
        try:
            plain = inflater.decompress(body, MAX_REWRITE + 1)
        except zlib.error:
            continue
        if inflater.eof and not inflater.unused_data and len(plain) <= MAX_REWRITE:
            return plain
        return None
    return None


def _under_api(rest: str) -> bool:
    return rest.startswith(API_PREFIX) and rest[len(API_PREFIX) : len(API_PREFIX) + 1] in (
        "",
        "/",
        "?",
        "#",
    )


def _port(scheme: str, port: int | None) -> int | None:
    return None if port == _DEFAULT_PORTS.get(scheme) else port


def _refuse(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} does not come back as the same number")
    return value
