"""The small model zoo in tests/zoo: the shapes pretrained models arrive in, built with the converter.

Each is a few kilobytes, seeded, and made the way real pretrained models are: the TFLite
converter's float16, dynamic-range, sparsity and full-integer options, plus the two things the
converter writes only from special exports (an SSD's ``TFLite_Detection_PostProcess`` and a
custom op), added to a converted model by flatbuffer surgery. Needs TensorFlow (the ``models``
extra); only ``tools/build_zoo.py --zoo`` imports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils
from flatbuffers import flexbuffers

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

SHAPE = (1, 16, 16, 3)
CLASSES = 10


class _Net(tf.Module):
    """A small CNN like the backbones real models use: conv, depthwise, pointwise with a residual
    branch, pooling and a dense head. Weights are seeded and large enough (over 1,024 elements)
    for dynamic-range quantization to touch them; ``sparsity`` zeroes that share of each kernel."""

    def __init__(self, sparsity: float = 0.0) -> None:
        super().__init__()
        rng = np.random.default_rng(20261204)

        def weight(*shape: int, scale: float = 0.3) -> tf.Variable:
            w = rng.standard_normal(shape).astype(np.float32) * scale
            if sparsity:
                w[rng.random(shape) < sparsity] = 0.0
            return tf.Variable(w)

        self.c1 = weight(3, 3, 3, 16)
        self.b1 = tf.Variable(rng.standard_normal(16).astype(np.float32) * 0.1)
        self.dw = weight(3, 3, 16, 1)
        self.pw = weight(1, 1, 16, 48, scale=0.2)
        self.skip = weight(1, 1, 16, 48, scale=0.2)
        self.c2 = weight(3, 3, 48, 32, scale=0.1)
        self.fc = weight(32, CLASSES)
        self.fb = tf.Variable(rng.standard_normal(CLASSES).astype(np.float32) * 0.1)

    def features(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.nn.relu(tf.nn.conv2d(x, self.c1, 1, "SAME") + self.b1)
        y = tf.nn.relu6(tf.nn.depthwise_conv2d(x, self.dw, [1, 1, 1, 1], "SAME"))
        y = tf.nn.conv2d(y, self.pw, 1, "SAME") + tf.nn.conv2d(x, self.skip, 1, "SAME")
        return tf.nn.relu(tf.nn.conv2d(y, self.c2, 2, "SAME"))

    def logits(self, x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(tf.reduce_mean(self.features(x), axis=[1, 2]), self.fc) + self.fb


def _convert(fn: tf.types.experimental.ConcreteFunction, module: tf.Module, **options: object) -> bytes:
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    for key, value in options.items():
        if key == "supported_types":
            converter.target_spec.supported_types = value
        elif key == "supported_ops":
            converter.target_spec.supported_ops = value
        else:
            setattr(converter, key, value)
    return bytes(converter.convert())


def _classifier(net: _Net) -> tf.types.experimental.ConcreteFunction:
    return tf.function(
        net.logits, input_signature=[tf.TensorSpec(SHAPE, tf.float32, name="image")]
    ).get_concrete_function()


# -- the converter's options -----------------------------------------------------------


def fp16_weights() -> bytes:
    """float16 weights behind DEQUANTIZE, float activations (the converter's float16 quantization)."""
    net = _Net()
    return _convert(
        _classifier(net), net, optimizations=[tf.lite.Optimize.DEFAULT], supported_types=[tf.float16]
    )


def dynamic_range() -> bytes:
    """int8 weights with float activations: hybrid kernels (dynamic-range quantization)."""
    net = _Net()
    return _convert(_classifier(net), net, optimizations=[tf.lite.Optimize.DEFAULT])


def sparse_weights() -> bytes:
    """Sparse float weights behind DENSIFY (the converter's sparsity option on 90 % zero kernels)."""
    net = _Net(sparsity=0.9)
    return _convert(_classifier(net), net, optimizations=[tf.lite.Optimize.EXPERIMENTAL_SPARSITY])


def _representative() -> Iterator[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    for _ in range(16):
        yield [rng.random(SHAPE, dtype=np.float32)]


def int8_uint8_io() -> bytes:
    """Full-integer int8 with uint8 input and output (QUANTIZE at both ends)."""
    net = _Net()
    return _convert(
        _classifier(net),
        net,
        optimizations=[tf.lite.Optimize.DEFAULT],
        representative_dataset=_representative,
        supported_ops=[tf.lite.OpsSet.TFLITE_BUILTINS_INT8],
        inference_input_type=tf.uint8,
        inference_output_type=tf.uint8,
    )


def float_classifier() -> bytes:
    """The plain float32 network, the starting point of ``edge quantize``."""
    net = _Net()
    return _convert(_classifier(net), net)


def control_flow() -> bytes:
    """A model with three subgraphs: a WHILE whose body refines the features a data-dependent number
    of times, and the cond subgraph."""
    net = _Net()

    def refine(x: tf.Tensor) -> tf.Tensor:
        f = net.features(x)
        steps = tf.cast(tf.reduce_mean(x) * 4.0, tf.int32) + 1

        def body(i: tf.Tensor, h: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return i + 1, tf.nn.relu(h * 0.5 + 0.25)

        _, f = tf.while_loop(lambda i, h: i < steps, body, [tf.constant(0), f])
        return tf.matmul(tf.reduce_mean(f, axis=[1, 2]), net.fc) + net.fb

    fn = tf.function(
        refine, input_signature=[tf.TensorSpec(SHAPE, tf.float32, name="image")]
    ).get_concrete_function()
    return _convert(fn, net)


# -- surgery: what only special exports write ---------------------------------------------

ANCHORS = 64
DETECTIONS = 10


def ssd_detector() -> bytes:
    """An SSD-style detector: a float backbone with box and class heads over 64 anchors, ending in
    ``TFLITE_DETECTION_POSTPROCESS`` (boxes, classes, scores, count)."""
    net = _Net()
    rng = np.random.default_rng(7)
    box_w = tf.Variable(rng.standard_normal((32, 4)).astype(np.float32) * 0.2)
    cls_w = tf.Variable(rng.standard_normal((32, CLASSES + 1)).astype(np.float32) * 0.5)

    def heads(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        f = tf.reshape(net.features(x), [1, ANCHORS, 32])
        boxes = tf.reshape(tf.matmul(f, box_w), [1, ANCHORS, 4], name="box_encodings")
        scores = tf.reshape(
            tf.nn.sigmoid(tf.matmul(f, cls_w)), [1, ANCHORS, CLASSES + 1], name="class_predictions"
        )
        return boxes, scores

    net.box_w, net.cls_w = box_w, cls_w
    fn = tf.function(
        heads, input_signature=[tf.TensorSpec(SHAPE, tf.float32, name="image")]
    ).get_concrete_function()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(_convert(fn, net)))
    sub = model.subgraphs[0]
    by_shape = {tuple(sub.tensors[t].shape): int(t) for t in sub.outputs}
    boxes, scores = by_shape[(1, ANCHORS, 4)], by_shape[(1, ANCHORS, CLASSES + 1)]
    grid = (np.arange(8, dtype=np.float32) + 0.5) / 8
    cy, cx = np.meshgrid(grid, grid, indexing="ij")
    anchors = np.stack([cy.ravel(), cx.ravel(), np.full(ANCHORS, 0.25), np.full(ANCHORS, 0.25)], 1)
    anchor = _add_tensor(model, "anchors", anchors.astype(np.float32))
    outs = [
        _add_tensor(model, "detection_boxes", None, [1, DETECTIONS, 4]),
        _add_tensor(model, "detection_classes", None, [1, DETECTIONS]),
        _add_tensor(model, "detection_scores", None, [1, DETECTIONS]),
        _add_tensor(model, "num_detections", None, [1]),
    ]
    options = flexbuffers.Dumps(
        {
            "max_detections": DETECTIONS,
            "max_classes_per_detection": 1,
            "detections_per_class": 100,
            "use_regular_nms": False,
            "nms_score_threshold": 0.3,
            "nms_iou_threshold": 0.6,
            "num_classes": CLASSES,
            "y_scale": 10.0,
            "x_scale": 10.0,
            "h_scale": 5.0,
            "w_scale": 5.0,
        }
    )
    _add_custom_op(model, "TFLite_Detection_PostProcess", [boxes, scores, anchor], outs, options)
    sub.outputs = np.array(outs, dtype=np.int32)
    _rename_signature(model, outs)
    return _pack(model)


def unknown_custom_op() -> bytes:
    """A float classifier whose logits pass through a custom op no runtime has (``EdgeZooSoftArgmax``)."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(float_classifier()))
    sub = model.subgraphs[0]
    logits = int(sub.outputs[0])
    out = _add_tensor(model, "soft_argmax", None, [1, CLASSES])
    _add_custom_op(model, "EdgeZooSoftArgmax", [logits], [out], b"")
    sub.outputs = np.array([out], dtype=np.int32)
    _rename_signature(model, [out])
    return _pack(model)


def _add_tensor(
    model: schema.ModelT, name: str, data: np.ndarray | None, shape: list[int] | None = None
) -> int:
    sub = model.subgraphs[0]
    t = schema.TensorT()
    t.name = name
    t.type = schema.TensorType.FLOAT32
    t.shape = np.array(shape if data is None else data.shape, dtype=np.int32)
    t.buffer = 0
    if data is not None:
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data.tobytes(), dtype=np.uint8)
        t.buffer = len(model.buffers)
        model.buffers.append(buffer)
    sub.tensors.append(t)
    return len(sub.tensors) - 1


def _add_custom_op(
    model: schema.ModelT, name: str, inputs: list[int], outputs: list[int], options: bytes
) -> None:
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = name
    code.version = 1
    model.operatorCodes.append(code)
    op = schema.OperatorT()
    op.opcodeIndex = len(model.operatorCodes) - 1
    op.inputs = np.array(inputs, dtype=np.int32)
    op.outputs = np.array(outputs, dtype=np.int32)
    op.customOptions = np.frombuffer(bytes(options), dtype=np.uint8) if options else None
    op.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
    model.subgraphs[0].operators.append(op)


def _rename_signature(model: schema.ModelT, outputs: list[int]) -> None:
    sub = model.subgraphs[0]
    for sig in model.signatureDefs or []:
        entries = []
        for t in outputs:
            entry = schema.TensorMapT()
            entry.name = sub.tensors[t].name
            entry.tensorIndex = t
            entries.append(entry)
        sig.outputs = entries


def _pack(model: schema.ModelT) -> bytes:
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


ZOO: dict[str, Callable[[], bytes]] = {
    "fp16_weights": fp16_weights,
    "dynamic_range": dynamic_range,
    "sparse_weights": sparse_weights,
    "int8_uint8_io": int8_uint8_io,
    "float_classifier": float_classifier,
    "ssd_detector": ssd_detector,
    "unknown_custom_op": unknown_custom_op,
    "control_flow": control_flow,
}
