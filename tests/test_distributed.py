"""Two real processes (torchrun, gloo on CPU) through Accelerate: disjoint data per rank, and training."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcm_lora.data.images import preprocess_image
from lcm_lora.world.dataset import write_imagefolder
from lcm_lora.world.scene import sample

ROOT = Path(__file__).resolve().parents[1]
N = 16


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("world"), N)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_rank_sees_disjoint_samples_per_epoch(data_dir, tmp_path, workers):
    _torchrun(str(ROOT / "tests" / "dist_data_probe.py"), str(data_dir), str(tmp_path), str(workers))
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
    result = _torchrun(str(ROOT / "train_lcm_lora.py"), "--pretrained_teacher_model", "teacher-eps",
                       "--train_data_dir", str(data_dir), "--resolution", "64", "--train_batch_size", "2",
                       "--max_train_steps", "2", "--lora_rank", "4", "--report_to", "none", "--seed", "0",
                       "--checkpointing_steps", "2", "--output_dir", str(tmp_path / "out"))
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert "data: no samples skipped (4 used) on the main process" in result.stdout
