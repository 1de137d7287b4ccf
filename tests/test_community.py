"""The shifted "dusk" world, its style score, and the community checkpoint / style LoRA builder."""

import filecmp
import hashlib

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from lcm_lora.world import assets
from tiny_world.community import CommunityRecipe, build
from tiny_world.judge import accuracy, judge_images, render_set
from tiny_world.quality import HELD_OUT_SEED, Scorer, load_judge, real_baseline
from lcm_lora.world.scene import PALETTES, render, sample, scene_from_seed, style_score

# sha256 of sample(seed)[1] for seeds 0-63 and 1_000_000-1_000_063, stacked, rendered by scene.py before
# palettes existed: the default palette must keep every image of the bundled world byte-identical.
BASE_WORLD_SHA256 = "c993777a2404c9047b59b2bff4e0311ff49eb4972ea0e74d6bb939a0a654d95c"


def test_default_palette_leaves_every_image_unchanged():
    seeds = [*range(64), *range(HELD_OUT_SEED, HELD_OUT_SEED + 64)]
    images = np.stack([sample(seed)[1] for seed in seeds])
    assert hashlib.sha256(images.tobytes()).hexdigest() == BASE_WORLD_SHA256
    for seed in seeds[:16]:
        scene = scene_from_seed(seed)
        assert np.array_equal(render(scene, seed, "base"), render(scene, seed))


def test_dusk_palette_changes_the_background_visibly_and_only_it():
    seeds = range(HELD_OUT_SEED, HELD_OUT_SEED + 50)
    scenes, base = render_set(seeds)
    dusk = render_set(seeds, "dusk")[1]
    for s, b, d in zip(scenes, base, dusk):
        background = np.isin(_pack(b), _pack(np.array(PALETTES["base"][s.background])))
        moved = np.linalg.norm(b.astype(float) - d, axis=-1)
        assert background.mean() > 0.7, s  # the object covers less than 30% of the image
        assert moved[background].min() >= 19  # every background pixel moves by >= 19 RGB levels
        assert moved[~background].max() == 0  # the object is untouched


def _pack(rgb: np.ndarray) -> np.ndarray:
    """RGB triples as single integers, for set membership."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def test_judge_reads_real_dusk_images():
    # Measured on 5000 held-out dusk images: 99.8% prompt accuracy (base world: 99.95%).
    scenes, images = render_set(range(HELD_OUT_SEED, HELD_OUT_SEED + 200), "dusk")
    acc = accuracy(judge_images(load_judge(), images)[0], scenes)
    assert acc["prompt"] >= 0.95, acc


def test_style_score_separates_dusk_from_base_images():
    seeds = range(HELD_OUT_SEED, HELD_OUT_SEED + 200)
    dusk, base = render_set(seeds, "dusk")[1], render_set(seeds)[1]
    assert style_score(dusk, "dusk") == 1.0
    assert style_score(base, "dusk") == 0.0
    # Mild sampling noise (sigma 6 levels) does not flip the vote.
    rng = np.random.default_rng(0)
    noisy = (dusk + rng.normal(0, 6, dusk.shape)).clip(0, 255).astype(np.uint8)
    assert style_score(noisy, "dusk") == 1.0


def test_quality_scores_against_the_dusk_world():
    scorer = Scorer(reference_images=300, palette="dusk")
    score = real_baseline(scorer, samples_per_prompt=1)
    assert score.prompt_accuracy >= 0.95 and score.style_score == 1.0, score
    assert score.row().count("|") == 8  # one more column than the base table
    base = real_baseline(Scorer(reference_images=300), samples_per_prompt=1)
    assert base.style_score is None and base.row().count("|") == 7 and "style_score" not in base.to_dict()


def test_build_writes_a_loadable_checkpoint_and_style_lora(tmp_path):
    recipe = CommunityRecipe(train_images=16, vae_steps=2, vae_batch=4, steps=2, batch=4, warmup_steps=1, check_images=8)
    build(tmp_path, recipe)
    teacher = assets.resolve("teacher-eps")
    checkpoint = tmp_path / "teacher-eps-dusk"
    for kept in ("text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert filecmp.cmp(teacher / kept, checkpoint / kept, shallow=False), kept
    pipe = StableDiffusionPipeline.from_pretrained(str(checkpoint), safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(str(teacher), safety_checker=None)
    moved = [not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters())]
    assert any(moved)  # the UNet was fine-tuned
    base.load_lora_weights(str(tmp_path / "style-dusk"), adapter_name="style")
    assert base.get_active_adapters() == ["style"]


def test_the_dataset_command_writes_the_dusk_world(tmp_path):
    from PIL import Image

    from lcm_lora.world.dataset import main

    main(["--out", str(tmp_path / "dusk"), "--num_images", "8", "--palette", "dusk"])
    images = np.stack([np.array(Image.open(p)) for p in sorted((tmp_path / "dusk").glob("*.png"))])
    assert len(images) == 8 and style_score(images, "dusk") == 1.0
    assert np.array_equal(images[3], render(scene_from_seed(3), 3, "dusk"))  # the same scenes, dusk backgrounds
