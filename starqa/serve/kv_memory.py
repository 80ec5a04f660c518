"""The documents' KV a server keeps in memory between requests, up to a number of bytes (`max_kv_memory`); the
least recently used is dropped first. Entries are keyed by the object folder a document's name linked to when its
KV was read, so a re-ingested or removed document is never answered from: its name links elsewhere now, and the
old entry is dropped at the next request (`forget_stale`). Used by the engine worker only; `snapshot` may be read
from any thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Entry:
    name: str
    context: object  # a starqa.store.context_kv.ContextKV
    nbytes: int
    last_used: float


class KVMemory:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def get(self, key: tuple):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            entry.last_used = time.time()
            self.hits += 1
            return entry.context

    def make_room(self, incoming: int) -> None:
        """Drop the least recently used until `incoming` more bytes fit (the KV about to be read)."""
        with self._lock:
            while self._entries and self._total() + incoming > self.max_bytes:
                self._entries.popitem(last=False)

    def put(self, key: tuple, name: str, context) -> None:
        """Keep `context` (unless it alone is larger than the limit), dropping the least recently used."""
        nbytes = context.nbytes()
        with self._lock:
            self._entries.pop(key, None)
            if nbytes > self.max_bytes:
                return
            while self._entries and self._total() + nbytes > self.max_bytes:
                self._entries.popitem(last=False)
            self._entries[key] = _Entry(name, context, nbytes, time.time())

    def forget_stale(self, linked) -> None:
        """Drop every entry whose document name no longer links to its object folder (`linked(name)` says where
        it links now, or None)."""
        with self._lock:
            for key in [key for key, entry in self._entries.items() if linked(entry.name) != Path(key[0])]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def snapshot(self) -> dict:
        with self._lock:
            documents = [{"name": entry.name, "bytes": entry.nbytes,
                          "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(entry.last_used))}
                         for entry in reversed(self._entries.values())]  # most recently used first
            return {"held_bytes": self._total(), "max_bytes": self.max_bytes, "documents": documents,
                    "hits": self.hits, "misses": self.misses}

    def _total(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())
