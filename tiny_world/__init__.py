"""The tiny world's harness, kept out of the installed package: building the bundled teachers, the judge, quality
sweeps and the trajectory probe. Run its modules from a clone of the repository (`python -m tiny_world.quality`).
The library (`lcm_lora`) imports nothing from here; here imports the library."""

from pathlib import Path

JUDGE = Path(__file__).parent / "assets" / "judge.safetensors"
