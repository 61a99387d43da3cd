"""Colours shared by the procedural worlds and the scene metrics.

Every pixel a world draws has one of these colours, so objects can be found again in any
frame (clean, decoded from h264, or generated) by nearest-palette colour. Object colours are
saturated and far apart in RGB so that compression and generation noise rarely flips one to
another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RGB = tuple[int, int, int]

# Object colours, in the order worlds draw from them.
OBJECT_COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
    "magenta": (210, 60, 210),
    "cyan": (40, 200, 210),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
}

BACKGROUND: RGB = (20, 20, 28)
FLOOR: RGB = (20, 20, 28)
WALL: RGB = (110, 110, 120)


@dataclass(frozen=True)
class ScenePalette:
    """The colours of one world: objects to detect and the colours that are not objects.

    objects: name -> colour of each detectable object (one object per colour).
    scenery: colours of everything else (background, walls, obstacles).
    """

    objects: dict[str, RGB]
    scenery: tuple[RGB, ...]

    @property
    def object_names(self) -> list[str]:
        return list(self.objects)

    def colours(self) -> np.ndarray:
        """(num_objects + num_scenery, 3) float32: objects first, then scenery."""
        rows = [*self.objects.values(), *self.scenery]
        return np.asarray(rows, dtype=np.float32)
