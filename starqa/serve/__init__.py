"""`starqa serve`: one process keeps the model and recently used documents' KV in memory and answers over HTTP on
a Unix socket in the store (and on TCP with an API key); `starqa ask` uses it by itself when it runs.

    protocol.py  requests, events and errors as they cross the socket (torch-free: the client imports it)
    client.py    what `starqa ask` does when a server answers (torch-free)
    app.py       the HTTP routes: parse, authenticate, queue, stream; no engine work
    worker.py    the engine worker: one thread, one FIFO queue, questions for one document batched
    kv_memory.py the documents' KV held in memory, least recently used dropped first
    server.py    the `serve` command: one server per store, sockets, signals

Only protocol and client may be imported by the CLI before it knows it will answer in its own process.
"""
