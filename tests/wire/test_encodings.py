"""Lossless codecs on the wire (zstd, lz4): bit-identical outputs, bounded decoding, old servers.

Covered:
- every OIP datatype round-trips through each codec, bit for bit, and a tensor that does not shrink
  stays raw;
- a corrupt frame, one that decodes to more bytes than the tensor holds (a 64 MiB zstd frame for a
  16-byte tensor, and an lz4 one), and an unknown encoding are each one TensorFormatError;
- through a real server, at every cut of every shipped model (helpers.SHIPPED), with zstd and with
  lz4: the outputs equal the whole model's, and at some cuts fewer bytes were sent than raw;
- the server advertises its codecs; one that advertises none gets raw tensors and still answers;
- large outputs come back compressed to a device that accepts the codec, and decode exactly;
- a corrupt compressed tensor sent to a real server is INVALID_ARGUMENT, and the server goes on.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge import models
from edge.cooperative import CooperativeRunner
from edge.errors import RemoteError, TensorFormatError
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from edge.wire import DATATYPES, ENCODING, WireTensor, decode, dtype_of, encode, encodings
from helpers import SHIPPED, seeded_inputs
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.grpc_service import EdgeServer
from server.repository import ModelRepository

CODECS = ["zstd", "lz4"]


def test_both_codecs_are_installed() -> None:
    assert encodings.available() == ("zstd", "lz4", "fp16", "int4")


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips(codec: str, datatype: str) -> None:
    dtype = dtype_of(datatype)
    rng = np.random.default_rng(7)
    if dtype.kind == "b":
        array = rng.integers(0, 2, (64, 64)).astype(dtype)
    elif dtype.kind == "f":
        array = np.zeros((64, 64), dtype=dtype)
        array[::3] = rng.standard_normal((22, 64)).astype(dtype)
    else:
        array = (rng.integers(0, 4, (64, 64))).astype(dtype)
    packed = encodings.compress(encode("t", array), codec)
    assert packed.parameters.get(ENCODING) == codec and packed.nbytes < array.nbytes
    out = decode(packed)
    assert out.dtype == array.dtype and np.array_equal(out, array)


@pytest.mark.parametrize("codec", CODECS)
def test_what_does_not_shrink_stays_raw(codec: str) -> None:
    noise = np.random.default_rng(1).integers(-128, 128, 256).astype(np.int8)
    tensor = encode("t", noise)
    assert encodings.compress(tensor, codec) is tensor


def _frame(codec: str, data: bytes) -> bytes:
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    import lz4.frame

    return lz4.frame.compress(data)


@pytest.mark.parametrize("codec", CODECS)
def test_bad_frames_are_one_clear_error(codec: str) -> None:
    small = WireTensor("t", "INT8", (16,), b"\x00" * 16)
    bomb = WireTensor("t", "INT8", (16,), _frame(codec, b"\x00" * (64 * 1024 * 1024)), {ENCODING: codec})
    with pytest.raises(TensorFormatError):
        decode(bomb)
    corrupt = WireTensor("t", "INT8", (16,), b"not a frame at all", {ENCODING: codec})
    with pytest.raises(TensorFormatError):
        decode(corrupt)
    short = WireTensor("t", "INT8", (16,), _frame(codec, b"\x01" * 8), {ENCODING: codec})
    with pytest.raises(TensorFormatError, match="needs 16 bytes"):
        decode(short)
    assert decode(WireTensor("t", "INT8", (16,), _frame(codec, small.data), {ENCODING: codec})).sum() == 0
    with pytest.raises(TensorFormatError, match="unknown encoding"):
        decode(WireTensor("t", "INT8", (16,), b"x", {ENCODING: "brotli"}))
    # A frame with bytes after it (a second frame, or junk) was taken, its tail ignored.
    trailing = WireTensor("t", "INT8", (16,), _frame(codec, small.data) + b"junk after", {ENCODING: codec})
    with pytest.raises(TensorFormatError, match="bytes after the"):
        decode(trailing)
    if codec == "zstd":  # a frame that does not say its size could expand to anything
        import zstandard

        unsized = zstandard.ZstdCompressor(write_content_size=False).compress(small.data)
        with pytest.raises(TensorFormatError, match="does not say its content size"):
            decode(WireTensor("t", "INT8", (16,), unsized, {ENCODING: codec}))


@pytest.fixture(scope="module")
def server() -> BackgroundServer:
    with BackgroundServer.from_files([models.model_path(name) for name in SHIPPED]) as running:
        yield running


def _cases() -> list[tuple[str, int]]:
    return [
        (name, k)
        for name in SHIPPED
        for k in range(ModelGraph.from_file(models.model_path(name)).num_operators)
    ]


@pytest.fixture(scope="module")
def runners() -> dict[str, ModelRunner]:
    return {name: ModelRunner(ModelGraph.from_file(models.model_path(name))) for name in SHIPPED}


@pytest.mark.parametrize("codec", CODECS)
def test_outputs_through_a_server_are_identical_at_every_cut(
    codec: str, server: BackgroundServer, runners: dict[str, ModelRunner]
) -> None:
    saved = 0
    with TailClient(server.address, timeout_s=10.0, codec=codec) as client:
        for name, k in _cases():
            runner = runners[name]
            x = seeded_inputs(runner.graph, 5)
            want = runner.run(x)
            head = runner.run_head(k, x)
            result = client.infer(name, head.cut, parameters={"split_point": k})
            got = {**head.outputs, **result.outputs}
            assert set(got) == set(want), (name, k)
            assert all(np.array_equal(got[t], v) for t, v in want.items()), (name, k)
            raw = sum(a.nbytes for a in head.cut.values())
            assert result.bytes_sent <= raw
            saved += result.bytes_sent < raw
    assert saved > 10, saved


def test_a_server_that_offers_no_codec_gets_raw_tensors(runners: dict[str, ModelRunner]) -> None:
    dataplane = DataPlane(ModelRepository.from_files([models.model_path("digits_resnet")]), codecs=())
    with BackgroundServer(EdgeServer(dataplane)) as old:
        runner = runners["digits_resnet"]
        device = CooperativeRunner(
            ModelRunner(runner.graph), TailClient(old.address, timeout_s=10.0, codec="zstd"),
            model_name="digits_resnet", policy=8,
        )  # fmt: skip
        try:
            x = seeded_inputs(runner.graph, 2)
            result = device.infer(x)
            assert result.offloaded and result.bytes_sent == runner.graph.cut(8).nbytes
            assert all(np.array_equal(result.outputs[t], v) for t, v in runner.run(x).items())
        finally:
            device.close()


def test_the_server_lists_its_codecs_and_compresses_large_outputs(server: BackgroundServer, tmp_path) -> None:
    import grpc
    from model_builder import slow_conv_model

    from edge.protocol import converters, pb, pb_grpc
    from edge.wire import ACCEPT_ENCODING, InferRequest
    from server.dataplane import COMPRESS_OUTPUTS_FROM

    with grpc.insecure_channel(server.address) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
            pb.ServerMetadataRequest(), timeout=10
        )
    assert encodings.offered(list(meta.extensions)) == ("zstd", "lz4", "fp16", "int4", "calibrated")
    path = tmp_path / "wide.tflite"
    path.write_bytes(slow_conv_model(size=16, channels=128))  # a float32 [1, 16, 16, 128] output: 128 KiB
    graph = ModelGraph.from_file(path)
    assert graph.outputs[0].nbytes >= COMPRESS_OUTPUTS_FROM
    x = {graph.inputs[0].name: np.zeros(graph.inputs[0].shape, dtype=np.float32)}  # zeros in, zeros out
    with BackgroundServer.from_files([path]) as wide, ModelRunner(graph) as runner:
        want = runner.run(x)
        request = InferRequest(model_name="wide", inputs=tuple(encode(k, v) for k, v in x.items()),
                               parameters={ACCEPT_ENCODING: "zstd"})  # fmt: skip
        with grpc.insecure_channel(wide.address) as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                converters.infer_request_to_pb(request), timeout=10
            )
        assert len(reply.raw_output_contents[0]) < graph.outputs[0].nbytes // 10
        assert reply.outputs[0].parameters[ENCODING].string_param == "zstd"
        with TailClient(wide.address, timeout_s=10.0, codec="zstd") as client:
            got = client.infer("wide", x).outputs
        assert all(np.array_equal(got[k], v) for k, v in want.items())


def test_a_corrupt_compressed_tensor_is_refused_and_the_server_goes_on(server: BackgroundServer) -> None:
    graph = ModelGraph.from_file(models.model_path("digits_resnet"))
    with TailClient(server.address, timeout_s=10.0) as client:
        from edge.protocol import converters
        from edge.wire import InferRequest

        tensor = graph.inputs[0]
        bad = WireTensor(tensor.name, "INT8", tensor.shape, b"garbage", {ENCODING: "zstd"})
        message = converters.infer_request_to_pb(InferRequest(model_name="digits_resnet", inputs=(bad,)))
        with pytest.raises(RemoteError) as err:
            client._send(message, lambda reply, ms: pytest.fail("the corrupt tensor was answered"), 10.0, "")
        assert err.value.status == "INVALID_ARGUMENT" and "zstd" in str(err.value)
        x = seeded_inputs(graph, 3)
        assert client.infer("digits_resnet", x).outputs


def test_edge_inspect_shows_compressed_bytes_per_cut(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from edge.cli import main

    np.save(tmp_path / "x.npy", models.digits_sample().x[0])
    assert (
        main(["inspect", "digits_resnet", "--codec", "zstd", "--sample", str(tmp_path / "x.npy"), "--json"])
        == 0
    )
    cuts = json.loads(capsys.readouterr().out)["cuts"]
    assert all(c["compressed_bytes"] <= c["bytes"] for c in cuts)
    assert sum(c["compressed_bytes"] < c["bytes"] for c in cuts) > 10
    assert main(["inspect", "digits_resnet", "--sample", str(tmp_path / "x.npy")]) == 2
    assert "--sample goes with --codec" in capsys.readouterr().err


def test_edge_infer_with_a_codec(
    tmp_path, server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.cli import main

    graph = ModelGraph.from_file(models.model_path("digits_resnet"))
    np.save(tmp_path / "x.npy", models.digits_sample().x[3])
    out = tmp_path / "y.npz"
    argv = ["infer", "--model", "digits_resnet", "--input", str(tmp_path / "x.npy"), "--server", server.address,
            "--split-at", "8", "--codec", "lz4", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    sent = int(capsys.readouterr().out.split(" bytes sent")[0].rsplit(" ", 1)[-1].replace(",", ""))
    assert sent < graph.cut(8).nbytes
    with ModelRunner(graph) as runner, np.load(out) as written:
        want = runner.run({graph.inputs[0].name: models.digits_sample().x[3:4]})
        assert all(np.array_equal(written[k], v) for k, v in want.items())


def test_a_profile_server_takes_a_codec(tmp_path) -> None:
    from edge.daemon import load

    path = tmp_path / "p.toml"
    path.write_text(
        'device_id = "c"\n[model]\npath = "digits_resnet"\n[split]\ntype = "fixed"\nk = 8\n'
        '[[edge.servers]]\naddress = "127.0.0.1:1"\ncodec = "zstd"\n[mqtt]\nhost = "localhost"\n'
        '[[sensors]]\ntopic = "s/+"\nformat = "json"\n'
    )
    assert load(path).edge.servers[0].codec == "zstd"
    from edge.errors import ConfigError

    path.write_text(path.read_text().replace('codec = "zstd"', 'codec = "brotli"'))
    with pytest.raises(ConfigError, match="codec"):
        load(path)


def test_fp16_halves_float_tensors_and_leaves_others() -> None:
    x = np.random.default_rng(3).standard_normal((4, 33)).astype(np.float32)
    packed = encodings.compress(encode("t", x), "fp16")
    assert packed.parameters[ENCODING] == "fp16" and packed.nbytes == x.nbytes // 2
    assert np.array_equal(decode(packed), x.astype(np.float16).astype(np.float32))
    ints = encode("i", np.arange(10, dtype=np.int32))
    assert encodings.compress(ints, "fp16") is ints


def test_int4_packs_two_to_a_byte_around_the_most_common_value() -> None:
    rng = np.random.default_rng(4)
    x = np.full(101, -128, dtype=np.int8)  # a ReLU output: mostly its zero point
    x[::3] = rng.integers(-128, 128, 34).astype(np.int8)
    packed = encodings.compress(encode("t", x), "int4")
    step = packed.parameters[encodings.INT4_STEP]
    assert packed.parameters[ENCODING] == "int4" and packed.nbytes == 51 and step == 17
    out = decode(packed)
    assert out.dtype == np.int8 and out.shape == x.shape
    assert np.array_equal(out[x == -128], x[x == -128])  # the zero point survives exactly
    assert np.abs(out.astype(int) - x.astype(int)).max() <= step // 2 + 1


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        (
            WireTensor(
                "t",
                "INT8",
                (4,),
                b"\x00",
                {ENCODING: "int4", encodings.INT4_BASE: 0, encodings.INT4_STEP: 1},
            ),
            "two elements a byte",
        ),
        (WireTensor("t", "INT8", (4,), b"\x00\x00", {ENCODING: "int4"}), "needs an int"),
        (
            WireTensor(
                "t",
                "INT8",
                (4,),
                b"\x00\x00",
                {ENCODING: "int4", encodings.INT4_BASE: 0, encodings.INT4_STEP: 0},
            ),
            "needs an int",
        ),
        (WireTensor("t", "INT32", (2,), b"\x00" * 4, {ENCODING: "fp16"}), "fp16 encodes FP32"),
        (WireTensor("t", "FP32", (2,), b"\x00" * 6, {ENCODING: "fp16"}), "fp16 encodes FP32"),
    ],
)
def test_bad_lossy_tensors_are_one_clear_error(tensor: WireTensor, needle: str) -> None:
    with pytest.raises(TensorFormatError, match=needle):
        decode(tensor)


@pytest.mark.parametrize(("name", "codec"), [("digits_resnet_f32", "fp16"), ("digits_resnet", "int4")])
def test_a_lossy_codec_is_flagged_and_close(name: str, codec: str, server: BackgroundServer, runners) -> None:
    runner = runners[name]
    sample = models.digits_sample()
    x = {runner.graph.inputs[0].name: (sample.x_float if codec == "fp16" else sample.x)[:1]}
    device = CooperativeRunner(ModelRunner(runner.graph), TailClient(server.address, timeout_s=10.0, codec=codec),
                               model_name=name, policy=8)  # fmt: skip
    try:
        result = device.infer(x)
    finally:
        device.close()
    assert result.offloaded and result.lossy and result.bytes_sent < runner.graph.cut(8).nbytes
    want = runner.run(x)
    (out,) = want
    assert int(np.argmax(result.outputs[out])) == int(np.argmax(want[out]))  # a clear digit keeps its class
