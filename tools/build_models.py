#!/usr/bin/env python3
"""Build the example TFLite models shipped in edge/models/.

Trains small digit classifiers on scikit-learn's bundled handwritten digits
(no download), exports them as full-integer int8 TFLite models, adds an untrained
MobileNetV2 for timing, and writes a held-out sample plus manifest.json.

Only this script imports TensorFlow; edge/ and server/ never do.
Run it with the ``models`` extra installed:

    pip install -e '.[models]'
    python tools/build_models.py [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np

# Must be set before TensorFlow is imported: quieter logs, and oneDNN's fused
# kernels reorder float sums, which makes reruns differ in the last bits.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tensorflow.lite.python import schema_py_generated as schema

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    Interpreter = None

logger = logging.getLogger("build_models")

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 20240607
IMAGE_SIZE = 32
HELD_OUT_FRACTION = 0.3
SAMPLE_SIZE = 200
CALIBRATION_SIZE = 300
MOBILENET_CALIBRATION_SIZE = 20
RESNET_EPOCHS = 20
EXIT_EPOCHS = 40
STUDENT_EPOCHS = 60
DISTILL_TEMPERATURE = 4.0
TINY_EPOCHS = 60
BATCH_SIZE = 32

_OPCODE_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_CUSTOM_OPCODE = schema.BuiltinOperator.CUSTOM


class BuildError(RuntimeError):
    """A built model does not meet the contract the runtime relies on."""


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # float32 [n, 32, 32, 1] in [0, 1]
    y_train: np.ndarray  # int64 [n]
    x_test: np.ndarray  # held out: never used for training or calibration
    y_test: np.ndarray


# --------------------------------------------------------------------------- seeding, data


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.keras.utils.set_random_seed(seed)  # python, numpy and tf in one call
    try:
        tf.config.experimental.enable_op_determinism()
    except AttributeError:  # older TF without the switch
        logger.warning("op determinism not available in TF %s", tf.__version__)
    # Single-threaded kernels: the models are tiny, and it removes reduction-order jitter.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def load_dataset() -> Dataset:
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., np.newaxis]  # 8x8 in [0, 1]
    labels = digits.target.astype(np.int64)
    upsampled = tf.image.resize(images, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear").numpy()
    upsampled = np.clip(upsampled, 0.0, 1.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        upsampled, labels, test_size=HELD_OUT_FRACTION, random_state=SEED, stratify=labels
    )
    logger.info("digits: %d train, %d held out, image %s", len(x_train), len(x_test), x_train.shape[1:])
    return Dataset(x_train, y_train, x_test, y_test)


# --------------------------------------------------------------------------- networks


def _conv_bn(x: Any, filters: int, kernel: int, stride: int, relu: bool, name: str) -> Any:
    layers = tf.keras.layers
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _residual_block(x: Any, filters: int, stride: int, name: str) -> Any:
    """Two 3x3 convs plus a skip path; a 1x1 projection when the shape changes."""
    layers = tf.keras.layers
    skip = x
    y = _conv_bn(x, filters, 3, stride, relu=True, name=f"{name}_a")
    y = _conv_bn(y, filters, 3, 1, relu=False, name=f"{name}_b")
    if stride != 1 or x.shape[-1] != filters:
        skip = _conv_bn(x, filters, 1, stride, relu=False, name=f"{name}_proj")
    y = layers.Add(name=f"{name}_add")([skip, y])
    return layers.ReLU(name=f"{name}_out")(y)


def build_resnet(batch_size: int | None = None) -> tf.keras.Model:
    layers = tf.keras.layers
    inputs = layers.Input((IMAGE_SIZE, IMAGE_SIZE, 1), batch_size=batch_size, name="image")
    x = _conv_bn(inputs, 16, 3, 2, relu=True, name="stem")  # 16x16x16
    x = _residual_block(x, 16, 1, "block1")
    x = _residual_block(x, 32, 2, "block2")  # 8x8x32
    x = _residual_block(x, 32, 1, "block3")
    x = _residual_block(x, 64, 2, "block4")  # 4x4x64
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(10, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="digits_resnet")


def build_resnet_exit(batch_size: int | None = None) -> tf.keras.Model:
    """digits_resnet with an early exit (BranchyNet-style) after block2 and a 1x1 bottleneck, where one
    int8 [1, 8, 8, 12] tensor (768 bytes, three quarters of the input) is live: pooled and classified there.
    Outputs: the exit's logits, then the final logits."""
    layers = tf.keras.layers
    inputs = layers.Input((IMAGE_SIZE, IMAGE_SIZE, 1), batch_size=batch_size, name="image")
    x = _conv_bn(inputs, 16, 3, 2, relu=True, name="stem")
    x = _residual_block(x, 16, 1, "block1")
    x = _residual_block(x, 32, 2, "block2")
    x = _conv_bn(x, 12, 1, 1, relu=True, name="bottleneck")  # 8x8x12: the exit reads here
    e = layers.GlobalAveragePooling2D(name="exit_pool")(x)
    exit_logits = layers.Dense(10, name="exit_logits")(e)
    x = _residual_block(x, 32, 1, "block3")
    x = _residual_block(x, 64, 2, "block4")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    logits = layers.Dense(10, name="logits")(x)
    return tf.keras.Model(inputs, {"a_exit": exit_logits, "b_final": logits}, name="digits_resnet_exit")


def train_exit(model: tf.keras.Model, data: Dataset, epochs: int) -> None:
    """Both heads at once: the exit's loss and the final one's, weighted alike."""
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss={"a_exit": loss, "b_final": loss})
    logger.info("training %s (%d params) for %d epochs", model.name, model.count_params(), epochs)
    targets = {"a_exit": data.y_train, "b_final": data.y_train}
    model.fit(data.x_train, targets, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=2)


def exit_first(model_bytes: bytes, exit_output: int) -> bytes:
    """The same graph with the operators that only the exit output needs moved as early as their
    inputs allow, so that the exit is computed in the head of every cut after the point it reads.

    The converter may schedule the exit branch last. Moving operators within a topological order
    changes no operator, tensor or buffer: the outputs stay bit for bit what they were.
    """
    model = schema.ModelT.InitFromPackedBuf(model_bytes, 0)
    subgraph = model.subgraphs[0]
    ops = subgraph.operators
    producer = {int(t): i for i, op in enumerate(ops) for t in op.outputs}

    def ancestors(tensor: int) -> set[int]:
        seen: set[int] = set()
        stack = [producer[tensor]] if tensor in producer else []
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack += [producer[int(t)] for t in ops[i].inputs if int(t) in producer]
        return seen

    outputs = [int(t) for t in subgraph.outputs]
    branch = ancestors(outputs[exit_output]) - set().union(
        *(ancestors(t) for j, t in enumerate(outputs) if j != exit_output)
    )
    order: list[int] = []
    done: set[int] = set()

    def ready(i: int) -> bool:
        return all(int(t) not in producer or producer[int(t)] in done for t in ops[i].inputs)

    pending = sorted(branch)
    for i in range(len(ops)):
        if i in branch:
            continue
        order.append(i)
        done.add(i)
        progress = True
        while progress:
            progress = False
            for j in list(pending):
                if ready(j):
                    order.append(j)
                    done.add(j)
                    pending.remove(j)
                    progress = True
    order += pending
    subgraph.operators = [ops[i] for i in order]
    builder = flatbuffers.Builder(len(model_bytes) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def build_tiny(batch_size: int | None = None) -> tf.keras.Model:
    layers = tf.keras.layers
    inputs = layers.Input((IMAGE_SIZE, IMAGE_SIZE, 1), batch_size=batch_size, name="image")
    x = layers.AveragePooling2D(4, name="pool")(inputs)  # back to 8x8
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(32, activation="relu", name="hidden")(x)
    outputs = layers.Dense(10, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="digits_tiny")


def train(model: tf.keras.Model, data: Dataset, epochs: int) -> None:
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    logger.info("training %s (%d params) for %d epochs", model.name, model.count_params(), epochs)
    model.fit(data.x_train, data.y_train, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=2)


# --------------------------------------------------------------------------- conversion


def batch_one(model: tf.keras.Model, build: Callable[[int | None], tf.keras.Model]) -> tf.keras.Model:
    """A batch-1 twin of a trained model, so every tensor in the export has a static shape."""
    twin = build(1)
    twin.set_weights(model.get_weights())
    return twin


def _converter(model: tf.keras.Model) -> tf.lite.TFLiteConverter:
    if model.input_shape[0] != 1:
        raise BuildError(f"{model.name}: export needs a batch-1 input, got {model.input_shape}")
    # from_concrete_functions leaves Keras 3 variables as READ_VARIABLE ops; from_keras_model freezes them.
    return tf.lite.TFLiteConverter.from_keras_model(model)


def _convert(converter: tf.lite.TFLiteConverter) -> bytes:
    # Keras prints every captured variable of the exported signature to stdout; keep it out of the progress log.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        blob = bytes(converter.convert())
    logger.debug("converter output:\n%s", captured.getvalue())
    return blob


def to_float_tflite(model: tf.keras.Model) -> bytes:
    return _convert(_converter(model))


def to_int8_tflite(model: tf.keras.Model, calibration: np.ndarray) -> bytes:
    def representative() -> Iterator[list[np.ndarray]]:
        for image in calibration:
            yield [image[np.newaxis].astype(np.float32)]

    converter = _converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return _convert(converter)


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class GraphInfo:
    opcodes: list[str]
    custom_ops: list[str]
    multi_tensor_cuts: list[int]


def inspect_graph(model_bytes: bytes) -> GraphInfo:
    """Opcode names of subgraph 0 in execution order, and the cuts that carry several tensors.

    Cut K splits the graph into ops [0, K) and [K, n). A cut is "multi-tensor" when two or
    more activations produced before K are still consumed at or after K, as inside a residual.
    """
    model = schema.ModelT.InitFromPackedBuf(model_bytes, 0)
    subgraph = model.subgraphs[0]
    opcodes, custom_ops = [], []
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin == _CUSTOM_OPCODE:
            name = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
            custom_ops.append(name)
            opcodes.append(f"CUSTOM:{name}")
        else:
            opcodes.append(_OPCODE_NAMES.get(builtin, f"BUILTIN_{builtin}"))

    producer = {t: i for i, op in enumerate(subgraph.operators) for t in op.outputs}
    last_use: dict[int, int] = {}
    for i, op in enumerate(subgraph.operators):
        for t in op.inputs:
            if t in producer:
                last_use[t] = i
    cuts = []
    for k in range(1, len(subgraph.operators)):
        live = {t for t, p in producer.items() if p < k and last_use.get(t, -1) >= k}
        if len(live) >= 2:
            cuts.append(k)
    return GraphInfo(opcodes, custom_ops, cuts)


def _tensor_summary(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail["quantization"]
    return {
        "name": detail["name"],
        "shape": [int(d) for d in detail["shape"]],
        "dtype": np.dtype(detail["dtype"]).name,
        "quantization": {"scale": float(scale), "zero_point": int(zero_point)} if scale else None,
    }


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)


def make_interpreter(model_bytes: bytes) -> Any:
    """The LiteRT interpreter the runtime uses; tf.lite.Interpreter (deprecated) if LiteRT is missing."""
    if Interpreter is None:
        return tf.lite.Interpreter(model_content=model_bytes, num_threads=1)
    return Interpreter(model_content=model_bytes, num_threads=1)


def evaluate(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the exported .tflite, one image per invoke (the models are batch 1)."""
    interpreter = make_interpreter(model_bytes)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    if inp["dtype"] == np.int8:
        scale, zero_point = inp["quantization"]
        x = quantize(x, scale, zero_point)
    correct = 0
    for image, label in zip(x, y, strict=True):
        interpreter.set_tensor(inp["index"], image[np.newaxis])
        interpreter.invoke()
        correct += int(np.argmax(interpreter.get_tensor(out["index"])[0]) == label)
    return correct / len(y)


def describe(
    file_name: str,
    model_bytes: bytes,
    int8: bool,
    accuracy: float | None,
    held_out: int | None,
    note: str | None = None,
) -> dict[str, Any]:
    interpreter = make_interpreter(model_bytes)
    interpreter.allocate_tensors()
    inputs = [_tensor_summary(d) for d in interpreter.get_input_details()]
    outputs = [_tensor_summary(d) for d in interpreter.get_output_details()]
    graph = inspect_graph(model_bytes)
    if graph.custom_ops:
        raise BuildError(f"{file_name}: custom ops outside the TFLite builtins: {graph.custom_ops}")
    if int8:
        for t in inputs + outputs:
            if t["dtype"] != "int8" or t["quantization"] is None:
                raise BuildError(
                    f"{file_name}: tensor {t['name']!r} is {t['dtype']}, expected quantized int8"
                )
    entry: dict[str, Any] = {
        "file": file_name,
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "size_bytes": len(model_bytes),
        "num_operators": len(graph.opcodes),
        "operators": graph.opcodes,
        "multi_tensor_cuts": graph.multi_tensor_cuts,
        "inputs": inputs,
        "outputs": outputs,
        "held_out_accuracy": accuracy,
        "held_out_images": held_out,
    }
    if note:
        entry["note"] = note
    return entry


# --------------------------------------------------------------------------- main


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    logger.info("wrote %s (%d bytes)", path, len(data))


def _seeded(seed: int, build: Callable[[int | None], tf.keras.Model]) -> tf.keras.Model:
    """Each model gets its own seed, so adding or reordering models does not change the others."""
    seed_everything(seed)
    return build(None)


def recalibrate_batchnorm(model: tf.keras.Model, images: np.ndarray) -> None:
    """Set every BatchNorm's moving statistics to those of ``images``, layer by layer.

    Freshly initialised BatchNorm layers (mean 0, variance 1) let random activations drift
    through fifty layers until the logits are all but constant, and a constant output would
    make equivalence checks at the model's output meaningless. Normalising each layer with
    real statistics keeps activations, and so the logits, varied.
    """
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            probe = tf.keras.Model(model.inputs, layer.input)
            x = probe.predict(images, batch_size=len(images), verbose=0)
            axes = tuple(range(x.ndim - 1))
            layer.moving_mean.assign(x.mean(axis=axes))
            layer.moving_variance.assign(x.var(axis=axes))


def build_mobilenet(batch_size: int | None = None) -> tf.keras.Model:
    inputs = tf.keras.layers.Input((224, 224, 3), batch_size=batch_size, name="image")
    return tf.keras.applications.MobileNetV2(
        alpha=0.35, input_tensor=inputs, weights=None, classes=1000, classifier_activation=None
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "edge" / "models",
        help="output directory (default: edge/models in the repo)",
    )
    parser.add_argument(
        "--only",
        choices=["digits_resnet_exit", "digits_student", "shapes_cnn", "shapes128"],
        help="build only this model, and update its entry in the existing manifest (the others stay as they are)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.only == "digits_resnet_exit":
        return build_exit_only(out)
    if args.only == "digits_student":
        return build_student_only(out)
    if args.only in SHAPES_MODELS:
        return build_shapes_only(out, args.only)

    seed_everything(SEED)
    data = load_dataset()
    rng = np.random.default_rng(SEED)
    calibration = data.x_train[rng.choice(len(data.x_train), CALIBRATION_SIZE, replace=False)]
    held_out = len(data.y_test)
    manifest: dict[str, Any] = {
        "tensorflow_version": tf.__version__,
        "evaluated_with": "tf.lite.Interpreter"
        if Interpreter is None
        else "ai_edge_litert.interpreter.Interpreter",
        "seed": SEED,
        "held_out_split": f"sklearn load_digits, train_test_split(test_size={HELD_OUT_FRACTION}, "
        f"random_state={SEED}, stratify=labels)",
        "models": {},
    }

    # digits_resnet: int8 and float32 exports of the same trained network.
    resnet = _seeded(SEED + 1, build_resnet)
    train(resnet, data, RESNET_EPOCHS)
    resnet = batch_one(resnet, build_resnet)
    resnet_int8 = to_int8_tflite(resnet, calibration)
    resnet_f32 = to_float_tflite(resnet)
    for name, blob, int8 in (("digits_resnet", resnet_int8, True), ("digits_resnet_f32", resnet_f32, False)):
        accuracy = evaluate(blob, data.x_test, data.y_test)
        logger.info("%s: held-out accuracy %.4f", name, accuracy)
        _write(out / f"{name}.tflite", blob)
        manifest["models"][name] = describe(f"{name}.tflite", blob, int8, accuracy, held_out)
    if not manifest["models"]["digits_resnet"]["multi_tensor_cuts"]:
        raise BuildError("digits_resnet: no cut carries two tensors; the residual was lost in conversion")

    # digits_tiny: runs on the device alone, fed the same int8 input as digits_resnet.
    tiny = _seeded(SEED + 2, build_tiny)
    train(tiny, data, TINY_EPOCHS)
    tiny = batch_one(tiny, build_tiny)
    tiny_int8 = to_int8_tflite(tiny, calibration)
    accuracy = evaluate(tiny_int8, data.x_test, data.y_test)
    logger.info("digits_tiny: held-out accuracy %.4f", accuracy)
    _write(out / "digits_tiny.tflite", tiny_int8)
    manifest["models"]["digits_tiny"] = describe("digits_tiny.tflite", tiny_int8, True, accuracy, held_out)
    resnet_q = manifest["models"]["digits_resnet"]["inputs"][0]["quantization"]
    tiny_q = manifest["models"]["digits_tiny"]["inputs"][0]["quantization"]
    if resnet_q != tiny_q:
        logger.warning("digits_tiny input quantization %s differs from digits_resnet %s", tiny_q, resnet_q)

    manifest["models"]["digits_resnet_exit"] = build_exit(out, data, calibration)

    # mobilenetv2_035: random weights, only for timing a realistically sized model.
    seed_everything(SEED + 3)
    mobilenet = build_mobilenet(1)
    images = (
        np.random.default_rng(SEED + 3)
        .uniform(-1.0, 1.0, (MOBILENET_CALIBRATION_SIZE, 224, 224, 3))
        .astype(np.float32)
    )
    recalibrate_batchnorm(mobilenet, images)
    mobilenet_int8 = to_int8_tflite(mobilenet, images)
    _write(out / "mobilenetv2_035.tflite", mobilenet_int8)
    manifest["models"]["mobilenetv2_035"] = describe(
        "mobilenetv2_035.tflite", mobilenet_int8, True, None, None, note="random weights, timing only"
    )

    # Held-out sample, quantized exactly as digits_resnet's input expects.
    x_float = data.x_test[:SAMPLE_SIZE]
    x_q = quantize(x_float, resnet_q["scale"], resnet_q["zero_point"])
    sample_path = out / "digits_test.npz"
    np.savez_compressed(sample_path, x=x_q, y=data.y_test[:SAMPLE_SIZE], x_float=x_float)
    logger.info("wrote %s (%d images)", sample_path, SAMPLE_SIZE)
    manifest["digits_test"] = {
        "file": sample_path.name,
        "sha256": hashlib.sha256(sample_path.read_bytes()).hexdigest(),
        "n": SAMPLE_SIZE,
        "x": "int8 [n,32,32,1], quantized with digits_resnet's input scale/zero_point",
        "x_float": "float32 [n,32,32,1] in [0,1]",
        "y": "int64 labels",
        "quantization": resnet_q,
    }

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote %s", out / "manifest.json")
    _print_summary(manifest)
    return 0


def build_exit(out: Path, data: Dataset, calibration: np.ndarray) -> dict[str, Any]:
    """digits_resnet_exit (int8): trained with both heads, exit operators scheduled early."""
    model = _seeded(SEED + 4, build_resnet_exit)
    train_exit(model, data, EXIT_EPOCHS)
    model = batch_one(model, build_resnet_exit)
    blob = to_int8_tflite(model, calibration)
    interpreter = make_interpreter(blob)
    names = [d["name"] for d in interpreter.get_output_details()]
    # The signature orders outputs by key: a_exit first. Check it against the graph's own outputs.
    exit_index = next((i for i, n in enumerate(names) if "a_exit" in n), 0)
    blob = exit_first(blob, exit_index)
    accuracies = evaluate_outputs(blob, data.x_test, data.y_test)
    logger.info("digits_resnet_exit: held-out accuracy per output %s", accuracies)
    _write(out / "digits_resnet_exit.tflite", blob)
    entry = describe("digits_resnet_exit.tflite", blob, True, max(accuracies), len(data.y_test))
    entry["held_out_accuracy_per_output"] = accuracies
    return entry


def evaluate_outputs(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Top-1 accuracy of every output of a classifier with several heads."""
    interpreter = make_interpreter(model_bytes)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    outs = interpreter.get_output_details()
    scale, zero_point = inp["quantization"]
    xq = quantize(x, scale, zero_point)
    correct = [0] * len(outs)
    for image, label in zip(xq, y, strict=True):
        interpreter.set_tensor(inp["index"], image[np.newaxis])
        interpreter.invoke()
        for j, out in enumerate(outs):
            correct[j] += int(np.argmax(interpreter.get_tensor(out["index"])[0]) == label)
    return [c / len(y) for c in correct]


def build_exit_only(out: Path) -> int:
    seed_everything(SEED)
    data = load_dataset()
    rng = np.random.default_rng(SEED)
    calibration = data.x_train[rng.choice(len(data.x_train), CALIBRATION_SIZE, replace=False)]
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["models"]["digits_resnet_exit"] = build_exit(out, data, calibration)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("updated %s", manifest_path)
    _print_summary(manifest)
    return 0


def soft_targets(teacher: bytes, x: np.ndarray, temperature: float) -> np.ndarray:
    """The teacher's (a shipped .tflite's) output distribution on ``x``, softened by ``temperature``."""
    interpreter = make_interpreter(teacher)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    xq = quantize(x, *inp["quantization"])
    scale, zero_point = out["quantization"]
    logits = []
    for image in xq:
        interpreter.set_tensor(inp["index"], image[np.newaxis])
        interpreter.invoke()
        logits.append((interpreter.get_tensor(out["index"])[0].astype(np.float32) - zero_point) * scale)
    z = np.stack(logits) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def distill(
    student: tf.keras.Model, data: Dataset, soft: np.ndarray, temperature: float, epochs: int
) -> None:
    """Hinton et al.'s knowledge distillation: KL to the teacher's softened outputs (scaled by T^2),
    plus the cross-entropy on the true labels, weighted alike."""
    x = tf.constant(data.x_train)
    hard = tf.constant(data.y_train)
    soft_t = tf.constant(soft)
    optimizer = tf.keras.optimizers.Adam(1e-3)
    ce = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kl = tf.keras.losses.KLDivergence()
    n = len(data.y_train)
    rng = np.random.default_rng(SEED + 5)
    logger.info(
        "distilling %s (%d params) for %d epochs at T=%g",
        student.name,
        student.count_params(),
        epochs,
        temperature,
    )
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            with tf.GradientTape() as tape:
                logits = student(tf.gather(x, idx), training=True)
                loss = 0.5 * ce(tf.gather(hard, idx), logits) + 0.5 * temperature**2 * kl(
                    tf.gather(soft_t, idx), tf.nn.softmax(logits / temperature)
                )
            grads = tape.gradient(loss, student.trainable_variables)
            optimizer.apply_gradients(zip(grads, student.trainable_variables, strict=True))


def build_student(batch_size: int | None = None) -> tf.keras.Model:
    """digits_tiny's shape with a wider hidden layer: small enough for any device (about 4k parameters)."""
    layers = tf.keras.layers
    inputs = layers.Input((IMAGE_SIZE, IMAGE_SIZE, 1), batch_size=batch_size, name="image")
    x = layers.AveragePooling2D(4, name="pool")(inputs)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(48, activation="relu", name="hidden")(x)
    outputs = layers.Dense(10, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="digits_student")


def cascade_accuracy(
    small: bytes, big: bytes, x: np.ndarray, y: np.ndarray, local_share: float
) -> dict[str, float]:
    """The cascade small -> big on held-out data at the max-probability threshold answering ``local_share``."""

    def run(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        interpreter = make_interpreter(blob)
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        xq = quantize(x, *inp["quantization"])
        scale, zero_point = out["quantization"]
        probs, labels = [], []
        for image in xq:
            interpreter.set_tensor(inp["index"], image[np.newaxis])
            interpreter.invoke()
            z = (interpreter.get_tensor(out["index"])[0].astype(np.float64) - zero_point) * scale
            p = np.exp(z - z.max())
            probs.append((p / p.sum()).max())
            labels.append(int(np.argmax(z)))
        return np.array(probs), np.array(labels)

    conf, small_labels = run(small)
    _, big_labels = run(big)
    threshold = float(np.quantile(conf, 1.0 - local_share))
    local = conf >= threshold
    answer = np.where(local, small_labels, big_labels)
    return {
        "local_share": float(local.mean()),
        "threshold": threshold,
        "cascade_accuracy": float((answer == y).mean()),
        "small_alone": float((small_labels == y).mean()),
        "big_alone": float((big_labels == y).mean()),
    }


def build_student_only(out: Path) -> int:
    """digits_student: distilled from the shipped digits_resnet (int8) on soft targets, quantized to int8."""
    seed_everything(SEED)
    data = load_dataset()
    rng = np.random.default_rng(SEED)
    calibration = data.x_train[rng.choice(len(data.x_train), CALIBRATION_SIZE, replace=False)]
    teacher = (out / "digits_resnet.tflite").read_bytes()
    soft = soft_targets(teacher, data.x_train, DISTILL_TEMPERATURE)
    student = _seeded(SEED + 5, build_student)
    distill(student, data, soft, DISTILL_TEMPERATURE, STUDENT_EPOCHS)
    student = batch_one(student, build_student)
    blob = to_int8_tflite(student, calibration)
    accuracy = evaluate(blob, data.x_test, data.y_test)
    tiny = (out / "digits_tiny.tflite").read_bytes()
    report = {
        "digits_student": cascade_accuracy(blob, teacher, data.x_test, data.y_test, 0.9),
        "digits_tiny": cascade_accuracy(tiny, teacher, data.x_test, data.y_test, 0.9),
    }
    logger.info("digits_student: held-out accuracy %.4f; cascades at 90%% local: %s", accuracy, report)
    _write(out / "digits_student.tflite", blob)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = describe("digits_student.tflite", blob, True, accuracy, len(data.y_test))
    entry["distilled_from"] = {"teacher": "digits_resnet.tflite", "temperature": DISTILL_TEMPERATURE}
    entry["cascade_at_90_percent_local"] = report
    manifest["models"]["digits_student"] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    _print_summary(manifest)
    return 0


SHAPES_TRAIN = 16_000
SHAPES_HELD_OUT = 2_000
SHAPES_EPOCHS = 12


def _shapes_net(batch_size: int | None, size: int, stem: tuple[int, int, int], name: str) -> tf.keras.Model:
    """A stem (filters, kernel, stride) to 32x32, then five residual blocks (32x32x24 -> 16x16x48 ->
    8x8x96), pooling and 8 classes."""
    layers = tf.keras.layers
    inputs = layers.Input((size, size, 3), batch_size=batch_size, name="image")
    x = _conv_bn(inputs, *stem, relu=True, name="stem")
    x = _residual_block(x, 24, 1, "block1")
    x = _residual_block(x, 48, 2, "block2")
    x = _residual_block(x, 48, 1, "block3")
    x = _residual_block(x, 96, 2, "block4")
    x = _residual_block(x, 96, 1, "block5")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(8, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name=name)


def build_shapes(batch_size: int | None = None) -> tf.keras.Model:
    """A small residual network for the colour shapes of tools/shapes_data.py, 32x32x3 in, 8 classes."""
    return _shapes_net(batch_size, 32, (24, 3, 1), "shapes_cnn")


def build_shapes128(batch_size: int | None = None) -> tf.keras.Model:
    """The same shapes drawn at 128x128: shapes_cnn's body behind a patchify stem (a 4x4 convolution
    of stride 4, as ConvNeXt-style networks begin). The stem's 32x32x16 output is a third of the
    input's bytes for a fifth of the time, so on a slow link an early cut, and its codec, matter."""
    return _shapes_net(batch_size, 128, (16, 4, 4), "shapes128")


# name: (network, image size, training images, epochs, seed offset)
SHAPES_MODELS: dict[str, tuple[Callable[[int | None], tf.keras.Model], int, int, int, int]] = {
    "shapes_cnn": (build_shapes, 32, SHAPES_TRAIN, SHAPES_EPOCHS, 6),
    "shapes128": (build_shapes128, 128, 10_000, 10, 8),
}


def build_shapes_only(out: Path, name: str) -> int:
    """A shapes model: trained on colour shapes drawn here (tools/shapes_data.py), quantized to int8,
    and measured on shapes drawn from another seed: a trained model beyond digits, nothing downloaded."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import shapes_data

    build, size, count, epochs, offset = SHAPES_MODELS[name]
    seed_everything(SEED + offset)
    x_train, y_train = shapes_data.make(count, SEED + offset, size)
    x_test, y_test = shapes_data.make(SHAPES_HELD_OUT, SEED + offset + 1, size)
    data = Dataset(x_train, y_train, x_test, y_test)
    model = _seeded(SEED + offset, build)
    train(model, data, epochs)
    model = batch_one(model, build)
    rng = np.random.default_rng(SEED + offset)
    blob = to_int8_tflite(model, x_train[rng.choice(len(x_train), CALIBRATION_SIZE, replace=False)])
    accuracy = evaluate(blob, x_test, y_test)
    logger.info("%s: held-out accuracy %.4f", name, accuracy)
    _write(out / f"{name}.tflite", blob)
    entry = describe(f"{name}.tflite", blob, True, accuracy, len(y_test))
    entry["data"] = {
        "classes": list(shapes_data.CLASSES),
        "train": f"tools/shapes_data.py make({count}, seed={SEED + offset}, size={size})",
        "held_out": f"tools/shapes_data.py make({SHAPES_HELD_OUT}, seed={SEED + offset + 1}, size={size}), quantized "
        "with the input's scale and zero point; drawn again where needed (nothing shipped)",
    }
    manifest_path = out / "manifest.json"
    manifest = (
        json.loads(manifest_path.read_text())
        if manifest_path.is_file()
        else {"tensorflow_version": tf.__version__, "seed": SEED, "models": {}}
    )
    manifest["models"][name] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    _print_summary(manifest)
    return 0


def _print_summary(manifest: dict[str, Any]) -> None:
    print(f"\nTensorFlow {manifest['tensorflow_version']}")
    header = f"{'model':<20} {'bytes':>9} {'ops':>4} {'input':<22} {'in q (scale, zp)':<20} {'accuracy':>8}"
    print(header)
    print("-" * len(header))
    for name, m in manifest["models"].items():
        inp = m["inputs"][0]
        q = inp["quantization"]
        qs = f"{q['scale']:.6f}, {q['zero_point']}" if q else "-"
        acc = f"{m['held_out_accuracy']:.4f}" if m["held_out_accuracy"] is not None else "n/a"
        shape = f"{inp['dtype']} {inp['shape']}"
        print(f"{name:<20} {m['size_bytes']:>9} {m['num_operators']:>4} {shape:<22} {qs:<20} {acc:>8}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BuildError as err:
        print(f"build_models: {err}", file=sys.stderr)
        sys.exit(2)
