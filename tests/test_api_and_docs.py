"""The package's Python API works as its docstring shows, and the README stays a front door: short, with the
commands that CI and a new user run."""

import re
from pathlib import Path

import lcm_lora
from lcm_lora import TrainConfig
from lcm_lora.world.dataset import write_imagefolder

ROOT = Path(__file__).parents[1]


def test_the_documented_api_trains_loads_generates_and_exports(tmp_path):
    assert set(lcm_lora.__all__) <= set(dir(lcm_lora))
    data = write_imagefolder(tmp_path / "data", 8)
    config = TrainConfig.from_yaml(ROOT / "configs" / "tiny.yaml", train_data_dir=str(data), max_train_steps=2,
                                   train_batch_size=4, lora_rank=4, output_dir=str(tmp_path / "run"),
                                   report_to="none", checkpointing_steps=0)
    assert config.data.train_data_dir == str(data) and config.distill.num_ddim_timesteps == 10  # the preset's N
    out = lcm_lora.train(config)
    pipe = lcm_lora.load_lcm_pipeline("teacher-eps", out)
    [image] = lcm_lora.generate(pipe, ["a red circle at the top left on a plain background"], num_inference_steps=2,
                                guidance_scale=1.0, seed=0)
    assert image.size == (64, 64) and len(set(image.getdata())) > 10
    [kohya] = lcm_lora.export_lora_files(out, tmp_path / "exported", ["kohya"])
    assert kohya.is_file()


def test_readme_is_a_short_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    for section in ("## Install", "## Quickstart", "## Training on a GPU", "## Using the LoRA", "## Results"):
        assert section in readme
    quickstart = readme.split("## Quickstart")[1].split("## ")[0]
    [block] = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
    assert len(block.strip().splitlines()) == 2  # the Quickstart is two command lines
    assert "python -m pytest -q" in readme  # what .ci/run runs
    assert not re.search(r"\b[0-9a-f]{7,40}\b", readme), "no commit hashes"
    for link in re.findall(r"\]\(((?:docs|lcm_lora)/[^)#]+)\)", readme):
        assert (ROOT / link).exists(), link


def test_the_library_imports_nothing_from_the_harness_and_the_wheel_leaves_it_out():
    import ast

    from setuptools import find_packages

    for path in (ROOT / "lcm_lora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "tiny_world" for n in names), path
    packages = find_packages(str(ROOT), include=["lcm_lora*"])  # pyproject.toml's [tool.setuptools.packages.find]
    assert "lcm_lora" in packages and not any(p.startswith("tiny_world") for p in packages)
    assert 'include = ["lcm_lora*"]' in (ROOT / "pyproject.toml").read_text()
    assert not (ROOT / "lcm_lora" / "world" / "assets" / "judge.safetensors").exists()
