"""``clips``: the second embedded model — 8-frame 16x16 video clips of a disc moving in
one of 8 directions, a class-conditional 3-D convolutional network trained here
(fastflow/demo/clips.py). A different data set and architecture from ``glyphs``, so
skipping is measured on more than one network, and on video."""

from __future__ import annotations

import os

from fastflow.hookspecs import hookimpl
from fastflow.modelspec import ModelSpec

DIRECTIONS = ["right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right"]


def clips_spec() -> ModelSpec:
    from fastflow.demo import DEFAULT_WEIGHTS_DIR
    from fastflow.models.glyphs import weights_key

    directory = os.path.join(os.path.dirname(DEFAULT_WEIGHTS_DIR), "clip-flow")

    def build():
        from fastflow.demo.clips import load

        return load(directory)

    def evaluate(samples, labels):
        from fastflow.demo.clips import evaluate as _evaluate

        return _evaluate(samples, labels)

    key = f"clips-{weights_key(directory)}" if os.path.isdir(directory) else "clips-missing"
    return ModelSpec(
        name="clips", build=build, shape=(3, 8, 16, 16), num_labels=8, null_label=8, default_guidance=3.0,
        description="class-conditional 3-D conv net on 8-frame 16x16 clips of a moving disc (embedded, video)",
        key=key, label_names=DIRECTIONS, evaluate=evaluate, data_range=2.0,
    )


@hookimpl
def register_models(register):
    register(clips_spec())
