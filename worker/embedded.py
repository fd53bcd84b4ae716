"""An embedded PostgreSQL server (the `pgserver` package) for the demo and the tests.

It runs from a data directory of its own and listens on a Unix socket inside it, so it needs no
port and no system Postgres. The socket path must stay short (Unix sockets allow ~100 bytes).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def embedded_postgres(data_dir: Path | None = None) -> Iterator[str]:
    """Start (or reuse) an embedded server; yields its URL; stops it (and deletes a temp dir)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        from pgserver import postgres_server

    keep = data_dir is not None
    path = data_dir or Path(tempfile.mkdtemp(prefix="lw-pg-"))
    server = postgres_server.get_server(path, cleanup_mode="stop" if keep else "delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
