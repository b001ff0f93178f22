"""Running a stage in a child process, alone or under torchrun, the way the kill, torchrun and shard tests do."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def dead_pid() -> int:
    """The pid of a process that has ended: what a lock or temp file of a killed run names."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra) -> dict:
    """This environment without torchrun's variables, one CPU thread, and `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def driver_command(tmp_path, driver: str, kwargs: dict, torchrun: bool = False) -> list[str]:
    """The command running `driver` (a script taking its keyword arguments as JSON) in a child process, or two
    under `torchrun --nproc_per_node=2` on a free local port."""
    script = tmp_path / "driver.py"
    script.write_text(driver)
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"]
    return [*launcher, str(script), json.dumps(kwargs)]


def run_to_end(command: list[str], timeout: float = 120, **env) -> str:
    """Run `command` in its own session; its output, or a test failure if it fails or hangs (then killed)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=child_env(**env), start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{' '.join(command[:4])} hung:\n{process.communicate()[0]}")
    assert process.returncode == 0, output
    return output
