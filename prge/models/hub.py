"""Is the Hugging Face hub reachable? A few-second probe, so that no network fails fast instead of after a minute of retries."""

from __future__ import annotations

import os
import socket
import threading


def offline() -> bool:
    """True when $HF_HUB_OFFLINE says so or the hub endpoint cannot be reached."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or not hub_reachable()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub endpoint within `timeout` seconds (DNS included)?"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing about a proxy; let huggingface_hub try
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    ok = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    # a thread, because name resolution ignores socket timeouts and can block for much longer
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


