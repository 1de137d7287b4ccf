"""Where the bundled world lives once the package is installed."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUNDLED = ("teacher-eps", "teacher-vpred")


def resolve(name_or_path: str | Path) -> Path:
    """A bundled teacher's name ("teacher-eps", "teacher-vpred") or any folder, as a path."""
    if str(name_or_path) in BUNDLED:
        return ASSETS / str(name_or_path)
    return Path(name_or_path)


def judge_path() -> Path:
    return ASSETS / "judge.safetensors"
