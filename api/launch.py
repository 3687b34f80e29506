"""Launching the local model-server process.

Kept free of heavy imports: `tokenmill serve` starts the child before importing the router (FastAPI,
uvicorn, gRPC, transformers' tokenizer; never torch), so the child's imports and weight loading overlap the
router's own start-up.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)


def start_model_server(model_server_args: Sequence[str]) -> tuple[str, subprocess.Popen]:
    """Start `tokenmill model-server` on a fresh unix socket; return its address and process."""
    socket_path = Path(tempfile.gettempdir()) / f"tokenmill-{os.getpid()}-{uuid.uuid4().hex[:6]}.sock"
    address = f"unix://{socket_path}"
    command = [sys.executable, "-m", "tokenmill.cli", "model-server", "--listen", address,
               "--parent-pid", str(os.getpid()), *model_server_args]
    logger.info("starting the model server: %s", " ".join(command))
    return address, subprocess.Popen(command)
