"""Container health: healthy when Triton reports every model ready and the page answers."""

import sys
import urllib.request

CHECKS = ("http://127.0.0.1:8000/v2/health/ready", "http://127.0.0.1:7860/")


def ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(0 if all(ok(u) for u in CHECKS) else 1)
