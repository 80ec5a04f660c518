"""What `starqa ask` does when a `starqa serve` runs on its store: send the ask, print the events it streams back
with the printer of an in-process ask (starqa.answer.events), so the output is the same bytes. torch-free, and it
imports nothing that is: the start-up an ask through a server saves is mostly torch's import.

An ask runs in this process instead (`ask` returns None) when nothing answers on the store's socket (none, or one
left by a killed server), when the ask must: it ingests a file first (--doc FILE and its options change the store),
or it runs as a rank under torchrun, or escalates hybrid answers to another model (--escalate-to MODEL: a server
holds one model); and when the server says it cannot answer this ask as this process would
(another model, dtype or device, several processes): the server decides, since only it knows what it holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from starqa import report
from starqa.errors import StarqaError
from starqa.serve import protocol
from starqa.store.root import store_root


class ServerFailure(StarqaError):
    """An error the server reported for this ask: printed as the same line, with the same exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def ask(settings, printer, *, docs: list[str], all_documents: bool, questions: list[str], attention: str,
        stream: bool, model: str | None, block_size: int | None, anchor_size: int | None, trust_remote_code: bool,
        ingest_flags: bool, debug: bool) -> int | None:
    """The exit code of the ask answered by the store's server, or None: answer it in this process."""
    root = store_root(settings.store)
    path = protocol.socket_path(root)
    if ingest_flags or _under_torchrun() or not _is_socket(path):
        return None
    if attention == "hybrid" and settings.escalate_to != "full":  # a server escalates only to full attention
        report.info(f"answering here: starqa serve does not escalate to another model ({settings.escalate_to})")
        return None
    if any(Path(doc).exists() and not _stored(root, doc) for doc in docs):
        return None  # --doc FILE: ingested first, here (the server never reads a path it is sent)
    body = {"questions": list(questions), "attention": attention, "stream": stream, "model": _model_spec(model),
            "trust_remote_code": trust_remote_code}
    body.update({"all": True} if all_documents else {"doc": list(docs)})
    body.update({key: getattr(settings, key) for key in protocol.SETTING_FIELDS
                 if key not in ("block_size", "anchor_size")})
    if block_size is not None or anchor_size is not None:  # sizes given on the command line are checked against
        body.update(block_size=settings.block_size, anchor_size=settings.anchor_size)  # the document's
    return _send(path, body, printer, debug)


def _send(path: Path, body: dict, printer, debug: bool) -> int | None:
    import httpx

    transport = httpx.HTTPTransport(uds=protocol.unix_address(path))
    # No read timeout: an answer may wait its turn in the queue. A server that dies closes the socket, which ends
    # the read at once.
    timeout = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=5.0)
    with httpx.Client(transport=transport, base_url="http://starqa", timeout=timeout) as client:
        try:
            with client.stream("POST", "/v1/ask", json=body) as response:
                if response.status_code == 409:  # the server cannot answer this ask as this process would
                    report.info(f"answering here: {_refusal(response)}")
                    return None
                if response.status_code != 200:
                    raise _refusal(response)
                started = False
                for line in response.iter_lines():
                    if not line:
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError as exc:  # a line cut short
                        raise _stopped(path, exc) from None
                    kind = event.get("type")
                    if kind == "unserved" and not started:  # the server stopped before this ask's turn
                        report.info(f"answering here: the server did not ({event.get('reason')})")
                        return None
                    started = True
                    if kind == "done":
                        return int(event["exit_code"])
                    if kind == "failed":
                        message = event["message"]
                        if event.get("internal") and not debug:
                            message += " (the server's log has the traceback)"
                        raise ServerFailure(message, int(event["exit_code"]))
                    printer(event)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return None  # a socket file nobody answers on: a server that was killed
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise _stopped(path, exc) from None
    raise _stopped(path, None)


def _refusal(response) -> StarqaError:
    try:
        error = json.loads(response.read())["error"]
        return ServerFailure(str(error["message"]), int(error.get("exit_code", 1)))
    except (ValueError, KeyError, TypeError):
        return ServerFailure(f"the starqa server answered HTTP {response.status_code}", 1)


def _stopped(path: Path, exc: BaseException | None) -> StarqaError:
    why = f" ({exc.__class__.__name__})" if exc is not None else ""
    return StarqaError(f"the starqa server on {path} stopped before the answer was complete{why}; ask again "
                       "(with --no-server to answer in this process)")


def _is_socket(path: Path) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def _stored(root: Path, doc: str) -> bool:
    return "/" not in doc and os.sep not in doc and (root / "documents" / doc).exists()


def _model_spec(model: str | None) -> str | None:
    """--model as the server must read it: a path made absolute (the server has its own working folder)."""
    if model is not None and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ
