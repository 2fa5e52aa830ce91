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
    for name, dims, dtype in tensors:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, np.array(dims, dtype=np.int32), dtype, 0
        sub.tensors.append(t)
    sub.operators = []
    for code, inputs, outputs in ops:
        op = schema.OperatorT()
        op.opcodeIndex = codes.index(code)
        op.inputs, op.outputs = np.array(inputs, dtype=np.int32), np.array(outputs, dtype=np.int32)
        if code == schema.BuiltinOperator.SHAPE:
            op.builtinOptionsType = schema.BuiltinOptions.ShapeOptions
            options = schema.ShapeOptionsT()
            options.outType = schema.TensorType.INT32
            op.builtinOptions = options
        elif code == schema.BuiltinOperator.ADD:
            op.builtinOptionsType = schema.BuiltinOptions.AddOptions
            op.builtinOptions = schema.AddOptionsT()
        sub.operators.append(op)
    sub.inputs, sub.outputs = np.array([0], dtype=np.int32), np.array([5], dtype=np.int32)
    sub.name = "main"
    model.subgraphs = [sub]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
