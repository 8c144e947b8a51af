"""The iBUG 300-W 68-point layout and how its groups are drawn (PAPER.md, "Landmark image")."""

from __future__ import annotations

from dataclasses import dataclass

NUM_POINTS = 68


@dataclass(frozen=True)
class Group:
    name: str
    start: int  # first point index (inclusive)
    stop: int  # last point index (exclusive)
    closed: bool
    color: tuple[int, int, int]  # RGB


# Nine line groups, each in its own colour on black. Colours are part of the training/serving
# contract: changing one invalidates every trained checkpoint.
GROUPS: tuple[Group, ...] = (
    Group("jaw", 0, 17, False, (255, 255, 255)),
    Group("right_eyebrow", 17, 22, False, (255, 128, 0)),
    Group("left_eyebrow", 22, 27, False, (255, 255, 0)),
    Group("nose_bridge", 27, 31, False, (0, 255, 0)),
    Group("lower_nose", 30, 36, True, (0, 255, 255)),
    Group("right_eye", 36, 42, True, (0, 0, 255)),
    Group("left_eye", 42, 48, True, (255, 0, 255)),
    Group("outer_lips", 48, 60, True, (255, 0, 0)),
    Group("inner_lips", 60, 68, True, (128, 128, 255)),
)

RIGHT_EYE = slice(36, 42)
LEFT_EYE = slice(42, 48)
MOUTH = slice(48, 68)
