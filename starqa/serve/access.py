"""Who a request to `starqa serve` comes from, and which documents it may see and ask.

- Over the store's Unix socket (0600: only the store's owner connects): the peer's uid, read with SO_PEERCRED when
  the connection is made (`PeerH11Protocol`); every document.
- Over TCP with the `--api-key` key: every document, recorded as the key `--api-key`.
- Over TCP with a scoped key (`starqa keys add`, starqa.governance.keys): the documents its globs match. Others are not
listed
  (`/v1/documents`, `/v1/models`), 404 when asked for by name there, and 403 on ask; a revoked key is 401.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hmac
import socket
import struct
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from starqa.governance.keys import Key, KeyRing
from starqa.serve.protocol import AskRequest, RequestError

PEER = "starqa.peer"  # in the ASGI scope's state: {"uid", "pid"} of a Unix-socket peer
IDENTITY = "starqa.identity"  # in the ASGI scope: the Identity of the request
ALL_KEY = "--api-key"  # the name audit records give the all-documents key


class PeerH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, which also puts the Unix-socket peer's credentials (SO_PEERCRED) in the state of
    every request of the connection (uvicorn copies `app_state` into each request's `scope["state"]`)."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is None or getattr(sock, "family", None) != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
            return
        try:
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
        except OSError:
            return
        self.app_state = {**self.app_state, PEER: {"uid": uid, "pid": pid}}


@dataclass(frozen=True)
class Identity:
    via: str  # "unix" or "tcp"
    who: dict  # as the audit log records it: {"uid", "user"} or {"key"}
    key: Key | None = None  # a scoped key; None: every document

    def allows(self, document: str) -> bool:
        return self.key is None or self.key.allows(document)


def over_unix_socket(scope) -> bool:
    server = scope.get("server")  # uvicorn: (path, None) on a Unix socket, (host, port) on TCP
    return bool(server) and server[1] is None


def peer(scope) -> str:
    """Who is on the other end of a request, for log lines: "unix" or "host:port"."""
    if over_unix_socket(scope):
        return "unix"
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "tcp"


def identify(scope, expected: bytes | None, ring: KeyRing | None) -> Identity | str:
    """The request's Identity, or why it is refused (401)."""
    if over_unix_socket(scope):
        from starqa.governance.audit import user_name

        peer = (scope.get("state") or {}).get(PEER) or {}
        uid = peer.get("uid")
        who = {"uid": uid, "user": user_name(uid)} if uid is not None else {"user": "unix-socket"}
        return Identity("unix", who)
    given = next((value for name, value in scope.get("headers", []) if name == b"authorization"), b"")
    client = scope.get("client")
    address = f"{client[0]}:{client[1]}" if client else None
    if expected is not None and hmac.compare_digest(given, expected):
        return Identity("tcp", {"key": ALL_KEY, "address": address})
    if ring is not None and given.startswith(b"Bearer "):
        key = ring.lookup(given[len(b"Bearer "):].decode("latin-1"))
        if key is not None and key.revoked:
            return f"the API key '{key.name}' was revoked on {key.revoked}"
        if key is not None:
            return Identity("tcp", {"key": key.name, "address": address}, key)
    return "missing or wrong API key: send the header 'Authorization: Bearer <key>'"


def identity_of(scope) -> Identity:
    return scope.get(IDENTITY) or Identity("unix", {"user": "unknown"})


def scoped_ask(identity: Identity, request: AskRequest, names) -> AskRequest:
    """`request` limited to what `identity` may ask: names it may not ask are 403; `all` and globs become the stored
    names it may ask (403 when there are none). `names()`: the stored names."""
    if identity.key is None:
        return request
    key = identity.key
    if request.all_documents:
        allowed = [name for name in names() if key.allows(name)]
        if not allowed:
            raise RequestError(403, f"the API key '{key.name}' may ask no stored document", "forbidden", 1)
        return dataclasses.replace(request, docs=tuple(allowed), all_documents=False)
    docs: list[str] = []
    stored = None
    for doc in request.docs:
        glob = any(char in doc for char in "*?[")
        if glob:
            stored = names() if stored is None else stored
        if glob and not (doc in stored and key.allows(doc)):  # a glob is expanded here, to the names allowed
            matches = [name for name in fnmatch.filter(stored, doc) if key.allows(name)]
            if not matches:
                raise RequestError(403, f"'{doc}' matches no document the API key '{key.name}' may ask", "forbidden",
                                   1)
            docs += [name for name in matches if name not in docs]
        elif not key.allows(doc):
            raise RequestError(403, f"the API key '{key.name}' may not ask the document '{doc}'", "forbidden", 1)
        elif doc not in docs:
            docs.append(doc)
    return dataclasses.replace(request, docs=tuple(docs))
