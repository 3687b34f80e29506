"""Seconds from `tokenmill serve` to its first answer, with the server's log lines timed from launch.

    python -m benchmarks.micro.startup [extra serve flags]
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.servers import free_port


def main() -> None:
    port = free_port()
    tokenmill = Path(sys.executable).parent / "tokenmill"
    start = time.perf_counter()
    server = subprocess.Popen([str(tokenmill), "serve", "--port", str(port), "--grpc-port", "0", *sys.argv[1:]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def echo() -> None:
        for line in server.stdout:
            if "503" not in line and line.strip():
                print(f"{time.perf_counter() - start:6.2f} {line.rstrip()[:150]}", flush=True)

    threading.Thread(target=echo, daemon=True).start()
    body = json.dumps({"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    try:
        while True:
            try:
                urllib.request.urlopen(request, timeout=30).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with code {server.returncode}")
                time.sleep(0.1)
        elapsed = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)
    print(f"first answer after {elapsed:.2f} s", flush=True)


if __name__ == "__main__":
    main()
