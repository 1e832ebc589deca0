"""Upstream paths that hand out credentials: never sent with a token the proxy holds.

The upstream's `/oauth/` endpoints mint and list credentials: `/oauth/locationToken`
turns an agency token into a Location token (with a refresh token), `/oauth/token`
exchanges codes and refresh tokens, `/oauth/installedLocations` lists where an app is
installed. A managed token attached to such a request would hand the caller a credential
that works straight against the API, past every limit and allow list of this proxy. So a
request for one of these paths is forwarded only with the caller's own HighLevel token
(pass-through); with a managed token it is refused with 403 `credential_path_refused`.

The check runs on the path as the upstream may read it: percent-decoded (repeatedly, so
`%256F` cannot hide an `o`), backslashes as slashes, empty and dot segments resolved,
`;parameters` dropped and case folded, so `//OAuth/./x/../locationToken` is caught too.
"""

from __future__ import annotations

import posixpath
from urllib.parse import unquote

from proxy.errors import CredentialPathRefused

# First path segments whose endpoints hand out or list credentials. Lower case.
CREDENTIAL_SEGMENTS = frozenset({"oauth"})
_MAX_DECODE_ROUNDS = 4


def normalized_path(raw_path: str) -> str:
    """The path part of a raw target, decoded and resolved the way a lenient server might."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote(path, errors="surrogateescape")
        if decoded == path:
            break
        path = decoded
    path = path.replace("\\", "/")
    segments = [segment.split(";", 1)[0] for segment in path.split("/")]
    resolved = posixpath.normpath("/" + "/".join(s for s in segments if s))
    return resolved.lower()


def is_credential_path(raw_path: str) -> bool:
    """True when the upstream would treat `raw_path` as one of its credential endpoints."""
    first = normalized_path(raw_path).lstrip("/").split("/", 1)[0]
    return first.strip() in CREDENTIAL_SEGMENTS


def refuse_managed_credential_request(raw_path: str) -> None:
    """Raise CredentialPathRefused for a credential path (call only for managed tokens)."""
    if is_credential_path(raw_path):
        raise CredentialPathRefused(
            "The proxy never sends its own tokens to the API's /oauth/ endpoints: they "
            "hand out credentials. Call them with your own HighLevel token (Authorization: "
            "Bearer <your token>), or let the proxy mint and refresh tokens for you"
        )
