"""Whether the Hugging Face hub may be used: the offline switches, and one quick reachability check."""
from __future__ import annotations

import os


def offline() -> bool:
    """HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1: the user said the hub is not to be used."""
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached (no DNS, connection refused, timeout), or None if it answers.
    One quick connection instead of the libraries' retries (half a minute of noise when offline).
    Behind a proxy the direct connection says nothing, so it is not tried."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
        return None
    except OSError as exc:
        return f"{endpoint.hostname}: {exc.strerror or exc}"
