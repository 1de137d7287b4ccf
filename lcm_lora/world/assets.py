"""Where the bundled world lives once the package is installed."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
# Names that resolve to bundled models: the three teachers (diffusers folders; teacher-sdxl is an SDXL-layout
# pipeline) and a "community checkpoint" of teacher-eps as one original-layout .safetensors (load it with
# config / --single_file_config teacher-eps).
BUNDLED_FILES = {"teacher-eps": "teacher-eps", "teacher-vpred": "teacher-vpred", "teacher-sdxl": "teacher-sdxl",
                 "community-dusk": "community-dusk.safetensors"}
BUNDLED = tuple(BUNDLED_FILES)
STYLE_LORA = "style-dusk"  # a style LoRA (diffusers format) for the stacking example, trained on the dusk world


def resolve(name_or_path: str | Path) -> Path:
    """A bundled model's name, the bundled style LoRA's, or any path, as a path."""
    name = str(name_or_path)
    if name in BUNDLED_FILES:
        return ASSETS / BUNDLED_FILES[name]
    if name == STYLE_LORA:
        return ASSETS / STYLE_LORA
    return Path(name_or_path)
