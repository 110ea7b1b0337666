"""One torchrun launch for the distributed tests: N gloo processes on the CPU, in their
own session, killed whole (and the test failed) on time-out."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from gradvitals import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 120, merge_timeout_s: str = "20",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node NPROC ARGS``; gradvitals' collectives wait at most
    ``merge_timeout_s`` for the other ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: merge_timeout_s,
           "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
