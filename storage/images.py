"""Images in issues: which image URLs a reader page can show.

Reader pages send a strict Content-Security-Policy whose ``img-src`` allows ``data:`` and the
``https://`` hosts of ``[reader] image_hosts``, nothing else. Any other image would be a broken
picture on a paid page, so ``issue import`` refuses such files (``image_problems``) and the
reader drops any that slipped through (a host removed from the config later) in favour of its
alt text (``image_allowed``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import urlsplit

from markdown_it.token import Token

# The renderer the reader uses, so the URLs checked are exactly the ones a page would request.
from storage.content import IssueFileError, IssueProblem, _md

__all__ = ["IMAGE_HOSTS_KEY", "check_images", "image_allowed", "image_problems", "image_sources"]

IMAGE_HOSTS_KEY = "[reader] image_hosts"

# The data: images markdown-it renders at all (others stay literal text); the CSP allows them
# and they make no request.
_DATA_IMAGE = re.compile(r"data:image/(?:gif|png|jpeg|webp)[;,]", re.IGNORECASE)


def _images(tokens: Iterable[Token]) -> Iterator[Token]:
    for tok in tokens:
        if tok.type == "image":
            yield tok
        if tok.children:
            yield from _images(tok.children)


def image_sources(markdown: str) -> list[str]:
    """Every image URL of ``markdown`` as the rendered page would request it, in order."""
    return [str(tok.attrs.get("src", "")) for tok in _images(_md.parse(markdown))]


def image_allowed(src: str, hosts: Sequence[str]) -> bool:
    """Whether a reader page can load ``src``: a data: image, or https on a listed host at the
    default port (what a CSP host source ``https://host`` matches)."""
    if _DATA_IMAGE.match(src):
        return True
    try:
        url = urlsplit(src)
        port = url.port
    except ValueError:  # a malformed port or IPv6 literal
        return False
    return (
        url.scheme.lower() == "https"
        and url.username is None
        and port in (None, 443)
        and (url.hostname or "") in {h.lower() for h in hosts}
    )


def _why_not(src: str, hosts: Sequence[str]) -> str:
    try:
        url = urlsplit(src)
        port = url.port
    except ValueError:
        return "is not a valid URL"
    if url.scheme.lower() == "http":
        return "is not https"
    if url.scheme.lower() != "https":
        return "is not an https:// URL"
    if (url.hostname or "") not in {h.lower() for h in hosts}:
        return f"is on host {url.hostname}, which is not listed"
    if url.username is not None:
        return "carries a user name"
    return f"uses port {port} (only the default https port can be allowed)"


def _hint(hosts: Sequence[str]) -> str:
    listed = ", ".join(hosts) if hosts else "none"
    return (f"reader pages show only https:// images from a host listed in {IMAGE_HOSTS_KEY} "
            f"(listed: {listed}); serve the image from such a host and list the host there, "
            "or remove the image")


def _bad_images(markdown: str, hosts: Sequence[str]) -> list[str]:
    return [f"image {src} {_why_not(src, hosts)}"
            for src in image_sources(markdown) if not image_allowed(src, hosts)]


def image_problems(markdown: str, *, file: str, hosts: Sequence[str]) -> list[IssueProblem]:
    """One problem per image of ``markdown`` that a reader page could not show (empty when all
    can), each naming the image URL and the key that would allow it."""
    return [IssueProblem(file, None, "body", f"{bad}: {_hint(hosts)}")
            for bad in _bad_images(markdown, hosts)]


def check_images(markdown: str, *, file: str, hosts: Sequence[str]) -> None:
    """Raise one ``IssueFileError`` listing every image a reader page could not show."""
    problems = image_problems(markdown, file=file, hosts=hosts)
    if problems:
        raise IssueFileError(problems)
