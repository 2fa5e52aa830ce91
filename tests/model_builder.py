"""Small .tflite models written with the flatbuffer schema, for shapes of graph the shipped models lack."""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema


def shape_tensor_model() -> bytes:
    """A float model whose middle cuts carry an int32 shape tensor, as EfficientNet's and many Keras
    models' do (SHAPE feeding RESHAPE)::

        x [1,4,4,2] -> ADD(x,x)=a -> SHAPE(x)=s -> ADD(a,a)=b -> RESHAPE(b, s)=r -> ADD(r,r)=y

    Cuts 2 and 3 send ``s``; random values there make RESHAPE fail.
    """
    shape = [1, 4, 4, 2]
    tensors = [
        ("x", shape, schema.TensorType.FLOAT32),
        ("a", shape, schema.TensorType.FLOAT32),
        ("s", [4], schema.TensorType.INT32),
        ("b", shape, schema.TensorType.FLOAT32),
        ("r", shape, schema.TensorType.FLOAT32),
        ("y", shape, schema.TensorType.FLOAT32),
    ]
    ops = [
        (schema.BuiltinOperator.ADD, [0, 0], [1]),
        (schema.BuiltinOperator.SHAPE, [0], [2]),
        (schema.BuiltinOperator.ADD, [1, 1], [3]),
        (schema.BuiltinOperator.RESHAPE, [3, 2], [4]),
        (schema.BuiltinOperator.ADD, [4, 4], [5]),
    ]
    return _model(tensors, ops, inputs=[0], outputs=[5])


def slow_conv_model(size: int = 24, channels: int = 512) -> bytes:
    """A float model of two same-padded 3x3 convolutions on [1, size, size, channels]: about
    ``size**2 * channels**2 * 18`` FLOPs each (2.7 G at the defaults: about 28 ms for both on one core here), for
    tests that need compute to take a while::

        x -> CONV_2D(x, w, b)=h -> CONV_2D(h, w, b)=y
    """
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((channels, 3, 3, channels)) * 0.05).astype(np.float32)
    bias = np.zeros(channels, dtype=np.float32)
    shape = [1, size, size, channels]
    tensors = [
        ("x", shape, schema.TensorType.FLOAT32),
        ("w", list(weights.shape), schema.TensorType.FLOAT32, weights),
        ("b", [channels], schema.TensorType.FLOAT32, bias),
        ("h", shape, schema.TensorType.FLOAT32),
        ("y", shape, schema.TensorType.FLOAT32),
    ]
    ops = [
        (schema.BuiltinOperator.CONV_2D, [0, 1, 2], [3]),
        (schema.BuiltinOperator.CONV_2D, [3, 1, 2], [4]),
    ]
    return _model(tensors, ops, inputs=[0], outputs=[4])


def _options(code: int) -> tuple[int, object] | None:
    if code == schema.BuiltinOperator.SHAPE:
        options = schema.ShapeOptionsT()
        options.outType = schema.TensorType.INT32
        return schema.BuiltinOptions.ShapeOptions, options
    if code == schema.BuiltinOperator.ADD:
        return schema.BuiltinOptions.AddOptions, schema.AddOptionsT()
    if code == schema.BuiltinOperator.CONV_2D:
        conv = schema.Conv2DOptionsT()
        conv.padding, conv.strideW, conv.strideH = schema.Padding.SAME, 1, 1
        conv.dilationWFactor = conv.dilationHFactor = 1
        return schema.BuiltinOptions.Conv2DOptions, conv
    return None


def _model(
    tensors: list, ops: list[tuple[int, list[int], list[int]]], *, inputs: list[int], outputs: list[int]
) -> bytes:
    """A one-subgraph model: tensors are (name, shape, type) or (name, shape, type, constant data)."""
    codes = sorted({op for op, _, _ in ops})
    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]
    model.operatorCodes = []
    for code in codes:
        oc = schema.OperatorCodeT()
        oc.builtinCode = code
        oc.deprecatedBuiltinCode = min(code, 127)
        oc.version = 1
        model.operatorCodes.append(oc)
    sub = schema.SubGraphT()
    sub.tensors = []
    for name, dims, dtype, *data in tensors:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, np.array(dims, dtype=np.int32), dtype, 0
        if data:
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(data[0].tobytes(), dtype=np.uint8)
            t.buffer = len(model.buffers)
            model.buffers.append(buffer)
        sub.tensors.append(t)
    sub.operators = []
    for code, op_inputs, op_outputs in ops:
        op = schema.OperatorT()
        op.opcodeIndex = codes.index(code)
        op.inputs, op.outputs = np.array(op_inputs, dtype=np.int32), np.array(op_outputs, dtype=np.int32)
        options = _options(code)
        if options is not None:
            op.builtinOptionsType, op.builtinOptions = options
        sub.operators.append(op)
    sub.inputs, sub.outputs = np.array(inputs, dtype=np.int32), np.array(outputs, dtype=np.int32)
    sub.name = "main"
    model.subgraphs = [sub]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
