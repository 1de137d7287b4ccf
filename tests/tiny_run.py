"""The few-second training run that trainer tests vary: the bundled epsilon teacher at 64x64, rank 4."""

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from lcm_lora.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(pretrained_teacher_model="teacher-eps", train_data_dir=str(data_dir), resolution=64,
                  train_batch_size=4, max_train_steps=2, lora_rank=4, lora_alpha=8, learning_rate=1e-3,
                  lr_warmup_steps=0, checkpointing_steps=1, report_to="none", output_dir=str(out), seed=0,
                  export_dtype="fp32")
    return TrainConfig.from_flat_dict({**values, **overrides})


def cli_args(flags: dict) -> list[str]:
    """A flat config as command-line flags (booleans as --flag / --no-flag)."""
    argv = []
    for key, value in flags.items():
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif value is not None and value != [] and value != ():
            argv += [f"--{key}", *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return argv


class TrainingProcess:
    """A training command in a process of its own (with `session`, in a new session, so a signal can reach its
    whole process group as Slurm's and systemd's do), its stderr collected as it comes."""

    def __init__(self, command: list[str], session: bool = False) -> None:
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=session)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.process.stderr.read1(4096), b""):
            self.chunks.append(chunk)

    @property
    def log(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for_step(self, steps: int, timeout: float = 300) -> None:
        """Until the progress bar shows a finished step: drawn from inside the loop, where stop handlers are set."""
        deadline = time.monotonic() + timeout
        while not re.search(rf"\| [1-9]\d*/{steps} ", self.log):
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended early:\n{self.log[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()  # a hung run must not outlive its test
                raise AssertionError(f"no step after {timeout} s:\n{self.log[-3000:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL to the process, or with `session` to every process of its session (torchrun's ranks start
        sessions of their own: those are found as the process's descendants)."""
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def finish(self, timeout: float = 300) -> int:
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=60)
        return self.process.returncode


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux's /proc; elsewhere none are found)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(child) for child in path.read_text().split()] if path.exists() else []
    return children + [grandchild for child in children for grandchild in descendants(child)]
