"""The fake model server of the tests, in a process of its own on gevent, for benchmarks.

Cooperative, so that a thousand connections waiting out the latency cost
greenlets, not threads. Prints its base URL once it listens.

    python -m bench.fake_model --latency 2.0
    python -m bench.fake_model --stream-interval 0.1 --reply-words 100   (10 s streams)
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402

from tests.fake_model_server import FakeModelServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--stream-interval", type=float, default=0.0, help="seconds between a stream's frames")
    parser.add_argument("--reply-words", type=int, default=0, help="answer with this many words (one delta each)")
    options = parser.parse_args()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with FakeModelServer(record=False) as server:
        server.latency = options.latency
        server.stream_interval = options.stream_interval
        if options.reply_words:
            server.reply_override = " ".join(f"w{n}" for n in range(options.reply_words))
        print(server.base_url, flush=True)
        stopped.wait()


if __name__ == "__main__":
    main()
