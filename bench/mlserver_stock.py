"""The MLServer runtime a user would write for a tail, as the baseline of ``bench/mlserver.py``.

It serves the tail file ``edge split`` writes, with MLServer's stock ``NumpyCodec`` on both ways:
MLServer has already turned the raw contents into Python lists, the codec makes arrays of them,
LiteRT runs the tail, and the codec turns the outputs back into lists. Nothing of edge's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class StockTail(MLModel):
    async def load(self) -> bool:
        self._interpreter = Interpreter(model_path=await get_model_uri(self.settings), num_threads=1)
        self._interpreter.allocate_tensors()
        self._inputs = {d["name"]: d for d in self._interpreter.get_input_details()}
        self._outputs = self._interpreter.get_output_details()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        for request_input in payload.inputs:
            detail: dict[str, Any] = self._inputs[request_input.name]
            array = NumpyCodec.decode_input(request_input).astype(detail["dtype"]).reshape(detail["shape"])
            self._interpreter.set_tensor(detail["index"], array)
        self._interpreter.invoke()
        outputs = [
            NumpyCodec.encode_output(d["name"], np.array(self._interpreter.get_tensor(d["index"])))
            for d in self._outputs
        ]
        return InferenceResponse(model_name=self.name, outputs=outputs)
