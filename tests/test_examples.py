"""Every script in examples/ runs as a user runs it (its own process, the bundled world, small settings) and does
what its docstring says: files written, images that are not blank, the toy's numbers printed. The distillation
and the toy run side by side, then the three examples that load the distilled LoRA run side by side, so the file
takes about 30 s on 2 cores."""

import importlib.util
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from lcm_lora.world import assets

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TIMEOUT_S = 300  # per example; each takes 5-15 s
PIP_HINT = 'pip install "lcm-lora[examples]"'


class Run:
    """One example in a process of its own, its output in files (a pipe could fill up and block it)."""

    def __init__(self, script: str, args: list, cwd: Path, env: dict | None = None) -> None:
        self.script, self.logs = script, cwd / f"{Path(script).stem}.log"
        self.stdout, self.stderr = open(self.logs.with_suffix(".out"), "w+"), open(self.logs.with_suffix(".err"), "w+")
        self.start = time.monotonic()
        self.process = subprocess.Popen([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd,
                                        stdout=self.stdout, stderr=self.stderr, env=env or example_env())
        self.seconds: float | None = None

    def wait(self) -> "Run":
        if self.seconds is None:
            try:
                self.process.wait(timeout=TIMEOUT_S)
            finally:
                self.process.kill()  # a no-op once it has ended
                self.seconds = time.monotonic() - self.start
        return self

    @property
    def out(self) -> str:
        self.stdout.seek(0)
        return self.stdout.read()

    @property
    def err(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def check(self) -> "Run":
        self.wait()
        assert self.process.returncode == 0, f"{self.script} failed:\n{self.out[-2000:]}\n{self.err[-4000:]}"
        return self


def example_env() -> dict:
    # Offline like a CI machine; one thread each, since two or three examples share the cores.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


class Examples:
    """Starts the distillation (it makes the LoRA the others load) and the toy at once; the first example that
    needs the LoRA starts all three that load it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.runs = tmp, {}
        self.lora = tmp / "lora"
        self.runs["distill"] = Run("distill_from_python.py", ["--max_train_steps", 2, "--num_images", 32,
                                                              "--data_dir", tmp / "world", "--output_dir", self.lora],
                                   tmp)
        if HAS_MATPLOTLIB:
            self.runs["toy"] = Run("consistency_toy_2d.py", ["--quick", "--out", tmp / "toy.png"], tmp)

    def with_lora(self, name: str) -> Run:
        if name not in self.runs:
            self.runs["distill"].check()
            lora = ["--lora", self.lora]
            self.runs["generate"] = Run("generate_4_steps.py", [*lora, "--output_dir", self.tmp / "generate"], self.tmp)
            self.runs["community"] = Run("community_checkpoint.py", [*lora, "--output_dir", self.tmp / "community"],
                                         self.tmp)
            self.runs["merge"] = Run("export_and_merge.py", [*lora, "--output_dir", self.tmp / "merge"], self.tmp)
        return self.runs[name].check()

    def close(self) -> None:
        for run in self.runs.values():
            run.process.kill()
            run.process.wait()
            run.stdout.close()
            run.stderr.close()


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    runner = Examples(tmp_path_factory.mktemp("examples"))
    yield runner
    runner.close()


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def assert_pictures(paths: list[Path], size: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    """Each a real picture: the size asked for, and not one flat colour (a NaN latent decodes to black)."""
    assert paths and all(p.is_file() for p in paths), paths
    images = [rgb(p) for p in paths]
    for path, image in zip(paths, images):
        assert image.shape[:2] == size[::-1], path
        assert image.std() > 5, f"{path} is nearly one colour (std {image.std():.2f})"
    return images


def test_distill_from_python_writes_a_trained_lora_on_the_preset_grid(examples):
    run = examples.runs["distill"].check()
    lora = examples.lora
    assert "distilling teacher-eps for 2 steps" in run.out
    assert (lora / "lcm-lora-teacher-eps.safetensors").is_file()
    assert "max_train_steps: 2" in (lora / "config.yaml").read_text()
    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        ups = [f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")]
    assert len(ups) > 50 and any(up.abs().max() > 0 for up in ups)  # B starts at 0: the 2 steps moved it
    # The LoRA examples' default --original_inference_steps 10 is this preset's N.
    assert meta["lcm_lora.num_ddim_timesteps"] == "10"


def test_generate_4_steps_writes_one_picture_per_prompt(examples):
    run = examples.with_lora("generate")
    paths = sorted((examples.tmp / "generate").glob("*.png"))
    assert len(paths) == 4 and run.out.count(".png: ") == 4
    images = assert_pictures(paths)
    assert all(np.abs(images[0] - other).mean() > 1 for other in images[1:])  # four prompts, four pictures


def test_community_checkpoint_stacks_the_style_lora(examples):
    examples.with_lora("community")
    out = examples.tmp / "community"
    alone = assert_pictures(sorted(out.glob("lcm-*.png")))
    stacked = assert_pictures(sorted(out.glob("lcm+style-*.png")))
    assert len(alone) == len(stacked) == 2
    # Same noise, same prompt: only the style adapter differs, and it changes the picture.
    assert all(np.abs(a - s).mean() > 1 for a, s in zip(alone, stacked))


def test_export_and_merge_writes_kohya_and_a_merged_file_that_samples_like_the_lora(examples):
    run = examples.with_lora("merge")
    out = examples.tmp / "merge"
    kohya = out / "kohya" / "lcm-lora-teacher-eps.safetensors"
    with safe_open(str(kohya), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())
    merged = out / "community-dusk-lcm.safetensors"
    with safe_open(str(merged), "pt") as m, safe_open(str(assets.resolve("community-dusk")), "pt") as c:
        assert set(m.keys()) == set(c.keys())
        changed = sum(not np.array_equal(m.get_tensor(k).numpy(), c.get_tensor(k).numpy()) for k in c.keys())
    assert f"{changed} weights changed" in run.out and changed > 50
    assert_pictures(sorted(out.glob("merged-*.png")))
    difference = int(re.search(r"largest pixel difference (\d+)", run.out).group(1))
    assert difference <= 2, run.out  # the merged file = the checkpoint with the LoRA loaded by diffusers


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason=f"the toy draws with matplotlib: {PIP_HINT}")
def test_consistency_toy_prints_its_quality_and_draws_the_figure(examples):
    run = examples.runs["toy"].check()
    rows = {int(m[1]): [float(x) for x in m.groups()[1:]] for m in re.finditer(
        r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)%$", run.out, re.M)}
    assert sorted(rows) == [1, 2, 4, 8], run.out
    assert all(math.isfinite(x) for row in rows.values() for x in row)
    ddim_1, _, consistency_1, on_mode_1 = rows[1]
    assert consistency_1 < ddim_1 / 10 and on_mode_1 > 50  # even 600 steps of distillation beat 1 DDIM step
    assert re.search(r"a second draw of the data \(the floor\)\s+[\d.]+", run.out)
    figure = rgb(examples.tmp / "toy.png")
    assert figure.shape[0] > 1000 and figure.shape[1] > 1000 and figure.std() > 10


def test_the_toy_names_the_extra_when_matplotlib_is_missing(tmp_path):
    blocker = tmp_path / "no_matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    env = {**example_env(), "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    run = Run("consistency_toy_2d.py", ["--out", tmp_path / "toy.png"], tmp_path, env).wait()
    assert run.process.returncode == 1
    assert run.err.strip().splitlines() == [f"consistency_toy_2d.py draws its figure with matplotlib: {PIP_HINT}"]
    assert not (tmp_path / "toy.png").exists()
    run.stdout.close()
    run.stderr.close()


@pytest.mark.parametrize("name, distributed, processes, machines", [
    ("single_gpu", "NO", 1, 1), ("multi_gpu_8", "MULTI_GPU", 8, 1), ("two_nodes", "MULTI_GPU", 16, 2)])
def test_accelerate_configs_load_with_accelerates_own_loader(name, distributed, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(EXAMPLES / "accelerate" / f"{name}.yaml"))
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (distributed, processes,
                                                                                            machines)
    assert config.mixed_precision == "bf16" and config.machine_rank == 0 and not config.use_cpu
    if machines > 1:
        assert config.main_process_ip and config.main_process_port
