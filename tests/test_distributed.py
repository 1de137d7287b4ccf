"""Two real processes (torchrun, gloo on CPU) through Accelerate: disjoint data per rank, and training."""

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lcm_lora.checkpoint import checkpoint_step, checkpoints, damage
from lcm_lora.data.images import preprocess_image
from lcm_lora.world.dataset import write_imagefolder, write_shards
from lcm_lora.world.scene import sample
from tiny_run import TrainingProcess, descendants

ROOT = Path(__file__).resolve().parents[1]
N = 16


def _torchrun(*args: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """torchrun, failing the test on a hang with every worker's Python stack and leaving no worker behind
    (torchrun starts each worker in a session of its own, and subprocess.run's timeout kills torchrun alone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = descendants(process.pid)
        for pid in workers:  # faulthandler prints each one's Python stack into our stderr, then it dies
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=30)
        for pid in [process.pid, *workers]:  # whatever is still running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = process.communicate()  # all the output, also after a second timeout
        pytest.fail(f"torchrun still running after {timeout} s; stacks:\n{stderr[-12000:]}\nstdout:\n{stdout[-1000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def _train_args(tmp_path, *data: str) -> list[str]:
    return [str(ROOT / "train_lcm_lora.py"), "--pretrained_teacher_model", "teacher-eps", *data, "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", "2", "--lora_rank", "4", "--report_to", "none",
            "--seed", "0", "--checkpointing_steps", "2", "--output_dir", str(tmp_path / "out")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("world"), N)


@pytest.fixture(scope="module")
def shard_spec(tmp_path_factory):
    pytest.importorskip("webdataset")
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, N, shard_size=2)
    return str(out / "shard-{00000..00007}.tar")


@pytest.mark.parametrize("workers, source", [(0, "folder"), (2, "folder"), (2, "shards")])
def test_each_rank_sees_disjoint_samples_per_epoch(data_dir, shard_spec, tmp_path, workers, source):
    data = shard_spec if source == "shards" else str(data_dir)
    _torchrun(str(ROOT / "tests" / "dist_data_probe.py"), data, str(tmp_path), str(workers), source)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    rng = None  # center crop, no flip: preprocessing is deterministic, so a sample's pixels identify it
    truth = {hashlib.sha1(preprocess_image(_pil(seed), 64, True, False, rng)[0].numpy().tobytes()).hexdigest()
             for seed in range(N)}
    assert len(ranks[0]) == len(ranks[1]) == N // 2
    assert not set(ranks[0]) & set(ranks[1])
    assert set(ranks[0]) | set(ranks[1]) == truth


def _pil(seed: int):
    from PIL import Image

    return Image.fromarray(sample(seed)[1])


def test_train_script_runs_on_two_processes(data_dir, tmp_path):
    result = _torchrun(*_train_args(tmp_path, "--train_data_dir", str(data_dir)))
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert "data: no samples skipped (8 used)" in result.stdout  # both ranks' counts


def test_train_from_shards_on_two_processes_counts_a_malformed_shard(shard_spec, tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    result = _torchrun(*_train_args(tmp_path, "--train_shards_path_or_url", f"{shard_spec}::{garbage}"),
                       "--max_train_steps", "5")
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    # 2 ranks x 5 steps x batch 2 = 20 used. 16 good samples in 8 shards: each rank's epoch is 4 batches, so
    # step 5 finishes epoch 1 (the garbage shard counted once, by the rank that has it) and starts epoch 2,
    # whose first batch counts it again if the new shard order puts it first on a rank.
    assert re.search(r"data: skipped ([12]) samples \(\1 unreadable shard after 0 samples\); used 20", result.stdout), \
        result.stdout


def test_a_rank_with_only_empty_shards_fails_clearly_instead_of_hanging(tmp_path):
    pytest.importorskip("webdataset")
    for k in range(2):
        with tarfile.open(tmp_path / f"empty{k}.tar", "w"):
            pass
    result = _torchrun(*_train_args(tmp_path, "--train_shards_path_or_url", str(tmp_path / "empty*.tar")), ok=False)
    assert "got no complete batch in a whole epoch" in result.stderr


def test_sigterm_to_every_process_of_a_torchrun_job_checkpoints_once_and_resumes(data_dir, tmp_path):
    """Slurm preemption as torchrun sees it: SIGTERM to every process of the job step (torchrun starts its ranks in
    sessions of their own, so Slurm signals them by its process tracking, not by process group). Each rank gets it
    directly and again from torchrun. The ranks agree on the step, write one intact checkpoint together and exit
    143; the run resumes from it under torchrun. (Data-loader workers under signals are tested in one process in
    test_run_safety.py: forking a worker from a torchrun rank, whose gloo threads may hold a lock at that moment,
    hung 2 runs of 6 here, which is left open.)"""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *_train_args(tmp_path, "--train_data_dir", str(data_dir)), "--max_train_steps", "200",
               "--checkpointing_steps", "200"]
    run = TrainingProcess(command, session=True)
    run.wait_for_step(200)
    for pid in [run.process.pid, *descendants(run.process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert run.finish() == 1 and "SignalException" in run.log  # torchrun's own report of the signal it got
    out = tmp_path / "out"
    [stopped] = checkpoints(out)
    step = checkpoint_step(stopped)
    assert damage(stopped) is None and not list(out.glob("*.partial")), run.log[-3000:]
    assert run.log.count(f"stopped by SIGTERM after step {step}; the state is in {stopped}") == 2, run.log[-3000:]
    assert "killed by signal" not in run.log
    _torchrun(*_train_args(tmp_path, "--train_data_dir", str(data_dir)), "--max_train_steps", str(step + 2),
              "--checkpointing_steps", "200", "--resume_from_checkpoint", "latest")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
