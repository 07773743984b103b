"""Headless Chromium as the browser tests launch it: only loopback resolves, nothing phones home."""

from urllib.parse import urlparse

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    # Nothing but loopback resolves: the network is cut off at the browser too.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


def only(origin, outside):
    """A route handler that lets requests to `origin` (host:port) and `data:` through, and
    aborts and records in `outside` every other."""

    def handle(route):
        url = route.request.url
        if urlparse(url).netloc == origin or url.startswith("data:"):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    return handle
