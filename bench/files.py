"""What files add to a turn and what an upload costs.

Embedded backend (SQLite file, archive in a local folder), the echo model,
requests through Flask's test client, so the figures are Parley's own work:
checking, hashing, writing and reading the bytes, base64 for the content
block. Turns without a file, with a 1 MiB image and with a 1 MiB PDF run in
a shuffled order on three conversations so machine noise hits all alike;
uploads of 1 KiB, 1 MiB and 10 MiB likewise. The figures that matter are
the ratios to the plain turn and to the 1 KiB upload.

    python -m bench.files [--turns 200] [--uploads 30]
"""
from __future__ import annotations

import argparse
import io
import random
import statistics
import struct
import tempfile
import time
import zlib
from pathlib import Path

from auth import create_key
from database_utils import get_session
from main import create_app
from states import Role

MIB = 1024 * 1024


def _png(size: int) -> bytes:
    """A PNG header (1024x1024) padded to `size` bytes with an ancillary chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0))
    return head + chunk(b"teXt", b"x" * (size - len(head) - 24)) + chunk(b"IEND", b"")


def _pdf(size: int) -> bytes:
    body = b"%PDF-1.4\n1 0 obj << /Type /Pages /Count 1 >> endobj\n2 0 obj << /Type /Page >> endobj\n"
    return body + b"%" + b"x" * (size - len(body) - 8) + b"\n%%EOF\n"


def _summary(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.95)] * 1000


def run(turns: int, uploads: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        app = create_app({
            "DATABASE_URL": f"sqlite:///{root / 'parley.db'}", "ARCHIVE_URL": (root / "archive").as_uri(),
            "LLM_PROVIDER": "echo", "LLM_MODEL": "echo", "RATELIMIT_ENABLED": False, "CONTEXT_MAX_TOKENS": 8000,
        })
        with app.app_context():
            secret = create_key(get_session(), Role.CLIENT, "bench")[1]
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"

        def upload(conversation_id: str, data: bytes, name: str) -> str:
            response = client.post(f"/conversations/{conversation_id}/files",
                                   data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")
            assert response.status_code == 201, response.json
            return response.json["file_id"]

        cases = {"no file": (None, None), "1 MiB image": (_png(MIB), "a.png"), "1 MiB PDF": (_pdf(MIB), "a.pdf")}
        conversations = {}
        for label, (data, name) in cases.items():
            conversation_id = client.post("/new_chat", json={"user_id": "bench"}).json["conversation_id"]
            conversations[label] = (conversation_id, [upload(conversation_id, data, name)] if data else [])
        turn_times: dict[str, list[float]] = {label: [] for label in cases}
        order = [label for label in cases for _ in range(turns)]
        random.shuffle(order)
        for label in order:
            conversation_id, file_ids = conversations[label]
            started = time.perf_counter()
            response = client.post("/chat", json={"conversation_id": conversation_id, "message": "what is this?", "file_ids": file_ids})
            turn_times[label].append(time.perf_counter() - started)
            assert response.status_code == 200, response.json

        sizes = {"1 KiB text": (b"a" * 1024, "a.txt"), "1 MiB image": (_png(MIB), "a.png"), "10 MiB image": (_png(10 * MIB), "b.png")}
        target = client.post("/new_chat", json={"user_id": "bench"}).json["conversation_id"]
        upload_times: dict[str, list[float]] = {label: [] for label in sizes}
        order = [label for label in sizes for _ in range(uploads)]
        random.shuffle(order)
        for label in order:
            data, name = sizes[label]
            started = time.perf_counter()
            upload(target, data, name)
            upload_times[label].append(time.perf_counter() - started)
        app.extensions["parley.engine"].dispose()
    return turn_times, upload_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--uploads", type=int, default=30)
    arguments = parser.parse_args()
    turn_times, upload_times = run(arguments.turns, arguments.uploads)
    for title, timings in (("/chat turn", turn_times), ("upload", upload_times)):
        baseline = _summary(next(iter(timings.values())))[0]
        print(f"{title:<12} {'case':<14} {'p50 ms':>8} {'p95 ms':>8} {'p50 ratio':>10}")
        for label, seconds in timings.items():
            p50, p95 = _summary(seconds)
            print(f"{'':<12} {label:<14} {p50:8.2f} {p95:8.2f} {p50 / baseline:9.2f}x")


if __name__ == "__main__":
    main()
