#!/usr/bin/env python3
"""Build the model shapes a user may bring (random weights, nothing downloaded) as .tflite files.

``--zoo`` writes the small zoo the tests run at every cut (tests/zoo: fp16, dynamic-range and
sparse weights, uint8 I/O, an SSD detector, a custom op, control flow; see
``tools/zoo_models.py``), with ``zoo.json`` saying what each covers. Without it, Keras
architectures are written that are too large to commit: they check that splitting and planning
hold on graphs the shipped models lack (shape tensors in EfficientNet, DenseNet's
concatenations, several inputs and outputs). Needs TensorFlow (the ``models`` extra):

    python tools/build_zoo.py --zoo --out tests/zoo
    python tools/build_zoo.py --out /tmp/zoo [--only efficientnetb0,densenet121]
    for m in /tmp/zoo/*.tflite; do edge plan "$m" --json > /dev/null && echo "$m ok"; done
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf


def _multi_io() -> tf.keras.Model:
    image = tf.keras.Input((32, 32, 3), name="image")
    extra = tf.keras.Input((8,), name="extra")
    x = tf.keras.layers.Conv2D(8, 3, activation="relu")(image)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    joined = tf.keras.layers.Concatenate()([x, tf.keras.layers.Dense(8)(extra)])
    return tf.keras.Model(
        [image, extra],
        [tf.keras.layers.Dense(10, name="classes")(joined), tf.keras.layers.Dense(1, name="score")(x)],
    )


class _FlattenSpatial(tf.keras.layers.Layer):
    """[N, H, W, C] to [N, H*W, C], the size computed from the tensor's own shape at run time. Keras 3
    takes raw TensorFlow ops only inside a layer's call, not on its symbolic inputs."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(x)
        return tf.reshape(x, tf.stack([shape[0], shape[1] * shape[2], shape[3]]))


def _reshaping() -> tf.keras.Model:
    """Reshape to a size computed from the input's shape: SHAPE, STRIDED_SLICE, PACK, RESHAPE."""
    image = tf.keras.Input((16, 16, 4), name="image")
    x = tf.keras.layers.Conv2D(8, 3, padding="same")(image)
    x = _FlattenSpatial()(x)
    x = tf.keras.layers.Dense(4)(x)
    return tf.keras.Model(image, tf.keras.layers.Flatten()(x))


ARCHITECTURES: dict[str, Callable[[], tf.keras.Model]] = {
    "mobilenetv2_224": lambda: tf.keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3)),
    "efficientnetb0": lambda: tf.keras.applications.EfficientNetB0(weights=None, input_shape=(224, 224, 3)),
    "densenet121": lambda: tf.keras.applications.DenseNet121(weights=None, input_shape=(224, 224, 3)),
    "multi_io": _multi_io,
    "reshaping": _reshaping,
}


def convert(model: tf.keras.Model, *, int8: bool) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(0)

        def representative() -> Iterator[dict[str, np.ndarray]]:
            for _ in range(4):
                yield {
                    i.name.split(":")[0]: rng.random((1, *i.shape[1:]), dtype=np.float32)
                    for i in model.inputs
                }

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", help="comma-separated names: " + ", ".join(ARCHITECTURES))
    p.add_argument("--float", action="store_true", help="also write float32 versions")
    p.add_argument("--zoo", action="store_true", help="write the small zoo the tests use (tests/zoo)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.zoo:
        return _write_zoo(args.out, args.only.split(",") if args.only else None)
    names = args.only.split(",") if args.only else list(ARCHITECTURES)
    for name in names:
        tf.keras.utils.set_random_seed(0)
        model = ARCHITECTURES[name]()
        for int8 in (True, False) if args.float else (True,):
            path = args.out / f"{name}{'' if int8 else '_f32'}.tflite"
            path.write_bytes(convert(model, int8=int8))
            print(f"wrote {path} ({path.stat().st_size:,} bytes)", flush=True)
    return 0


def _write_zoo(out: Path, only: list[str] | None) -> int:
    import hashlib
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import zoo_models

    manifest_path = out / "zoo.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest["tensorflow_version"] = tf.__version__
    entries = manifest.setdefault("models", {})
    for name in only or list(zoo_models.ZOO):
        build = zoo_models.ZOO[name]
        data = build()
        path = out / f"{name}.tflite"
        path.write_bytes(data)
        entries[name] = {
            "file": path.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "covers": " ".join((build.__doc__ or "").split()),
        }
        print(f"wrote {path} ({len(data):,} bytes)", flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
