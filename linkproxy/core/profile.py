# Placeholder until the profiles branch lands; replaced by it.
from dataclasses import dataclass
from typing import Optional, Pattern


@dataclass(frozen=True)
class Route:
    name: str
    method: Optional[bytes] = None
    path_regex: Optional[Pattern] = None
    timeout: Optional[float] = None
    retryable: bool = False


DEFAULT_ROUTE = Route("default")


def request_path(target):
    if target[:1] != b"/":
        i = target.find(b"://")
        if i >= 0:
            j = target.find(b"/", i + 3)
            target = target[j:] if j >= 0 else b"/"
    q = target.find(b"?")
    return target if q < 0 else target[:q]
