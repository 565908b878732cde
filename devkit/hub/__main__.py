"""Run the test hub by hand: serve model directories over both hub protocols on 127.0.0.1.

    python -m devkit.hub --port 8765 --repo demo/tiny=/path/to/model [--repo org/x=DIR ...] [--token T]

then e.g. ``HF_ENDPOINT=http://127.0.0.1:8765 pack build manifest.yaml`` (a manifest with
``source: huggingface, repo: demo/tiny``; ``source: modelscope`` works too, branch ``master``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from devkit.hub.server import HubServer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devkit.hub", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    ap.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR", help="serve DIR as a repo")
    ap.add_argument("--token", help="make every repo gated: requests must carry this token")
    args = ap.parse_args(argv)
    server = HubServer(args.host, args.port)
    for item in args.repo:
        repo_id, sep, directory = item.partition("=")
        if not sep or repo_id.count("/") != 1 or not Path(directory).is_dir():
            ap.error(f"--repo wants ORG/NAME=DIR with an existing DIR, got {item!r}")
        sha = server.add_repo_from_dir(repo_id, Path(directory), also_branches=("master",), token=args.token)
        print(f"{repo_id}: commit {sha} (branches main, master) from {directory}", flush=True)
    server.start()
    print(f"serving on {server.url}  (HF_ENDPOINT / MODELSCOPE_ENDPOINT); Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
