"""Calibrated feature codecs: the frame, its bounds, calibration, and a request through a real server.

Covered:
- frames round-trip to exactly the documented reconstruction, ``round(lo + (hi - lo) * code / top)``,
  computed here independently, for every bit width 1..8, with kept, dropped and flat channels; at 8
  bits on the full int8 range they are lossless;
- every malformed frame (not zstd, no content size, a size the shape does not allow, bytes after it,
  another version, channel count or bit width, a range upside down, codes too short) is one
  TensorFormatError, and none is decompressed past what the shape allows;
- a codec file is used only for its model and cuts; a file for another model, or a malformed one,
  is one ConfigError;
- ``edge codec calibrate`` on half of the shipped digits and ``edge codec eval`` on the other half:
  at least 8x fewer bytes than the raw int8 cut at no more than 1 pp, with and without labels;
- through a real server: the result is flagged lossy, its outputs equal the tail run here on the
  decoded tensors, the bytes counted are the frames'; a server that does not list the codec gets
  the raw tensors and answers exactly the whole model; outputs never come back through it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from edge import models
from edge.cli import main
from edge.codec import CodecFile, calibrate, fit
from edge.errors import ConfigError, RemoteError, TensorFormatError, UnknownCodecTableError
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from edge.wire import ACCEPT_ENCODING, ENCODING, MODEL_SHA256, SPLIT_POINT, WireTensor, decode, encode
from edge.wire.calibrated import MAX_TABLES, NAME, ChannelCodec, decode_frame
from helpers import REPO, RefusedAddress, start_logged
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.grpc_service import EdgeServer
from server.repository import ModelRepository

MODEL = "digits_resnet"
GRAPH = ModelGraph.from_file(models.model_path(MODEL))
CUT = 12
"""Two int8 tensors cross it (32 and 64 channels)."""


def _reference(values: np.ndarray, codec: ChannelCodec) -> np.ndarray:
    """The documented reconstruction, computed element by element in plain Python."""
    top = (1 << codec.bits) - 1
    flat = values.reshape(-1, codec.channels)
    out = np.empty_like(flat)
    for c in range(codec.channels):
        lo, hi = codec.lo[c], codec.hi[c]
        for i, v in enumerate(flat[:, c]):
            if not codec.kept[c]:
                out[i, c] = lo
                continue
            code = 0 if hi == lo else min(max(round((int(v) - lo) * top / (hi - lo)), 0), top)
            out[i, c] = min(max(round(lo + (hi - lo) * code / top), -128), 127)
    return out.reshape(values.shape)


def _values(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-128, 128, size=shape, dtype=np.int8)


@pytest.mark.parametrize("bits", range(1, 9))
def test_a_frame_decodes_to_the_documented_reconstruction(bits: int) -> None:
    values = _values((1, 5, 3, 6), bits)
    codec = ChannelCodec(
        bits,
        lo=(-128, -50, 10, 7, -128, 0),
        hi=(127, 40, 90, 7, -100, 0),
        kept=(True, True, True, True, True, False),
    )
    decoded = decode_frame(codec.encode(values), values.shape)
    assert decoded.dtype == np.int8 and decoded.shape == values.shape
    np.testing.assert_array_equal(decoded, _reference(values, codec))


def test_eight_bits_on_the_full_range_are_lossless() -> None:
    values = _values((2, 4, 4, 3))
    codec = ChannelCodec(8, lo=(-128,) * 3, hi=(127,) * 3, kept=(True,) * 3)
    np.testing.assert_array_equal(decode_frame(codec.encode(values), values.shape), values)


def _frame(body: bytes, *, content_size: bool = True) -> bytes:
    return bytes(zstandard.ZstdCompressor(write_content_size=content_size).compress(body))


def _body(codec: ChannelCodec, values: np.ndarray) -> bytes:
    return zstandard.ZstdDecompressor().decompress(codec.encode(values))


CODEC = ChannelCodec(2, lo=(-10, -20), hi=(10, 20), kept=(True, True))
VALUES = _values((1, 4, 4, 2))
GOOD = _body(CODEC, VALUES)


@pytest.mark.parametrize(
    "frame, needle",
    [
        (b"not zstd at all", "not a calibrated frame"),
        (_frame(GOOD, content_size=False), "does not say its size"),
        (_frame(GOOD + bytes(10_000)), "bytes; a tensor of shape"),
        (_frame(GOOD) + b"extra", "bytes after it"),
        (_frame(bytes([2]) + GOOD[1:]), "format 2"),
        (_frame(GOOD[:2] + (3).to_bytes(2, "little") + GOOD[4:]), "3 channels"),
        (_frame(GOOD[:4] + bytes([9]) + GOOD[5:]), "9 bits"),
        (_frame(GOOD[:6] + bytes([20, 10]) + GOOD[8:]), "hi is below its lo"),
        (_frame(GOOD[:-1]), "code bytes"),
        (_frame(bytes([1, 0, 2, 0]) + bytes(range(16)) + GOOD[10:]), "unknown codec table"),
    ],
    ids=[
        "not-zstd", "no-size", "too-large", "trailing", "version", "channels", "bits", "range", "short",
        "unknown-table",
    ],
)  # fmt: skip
def test_a_bad_frame_is_one_clear_error(frame: bytes, needle: str) -> None:
    with pytest.raises(TensorFormatError, match=needle):
        decode_frame(frame, VALUES.shape)


def test_a_frame_names_its_table_once_the_receiver_holds_it() -> None:
    values = _values((1, 3, 3, 40))
    codec = ChannelCodec(3, lo=tuple(range(-100, -60)), hi=tuple(range(0, 80, 2)), kept=(True,) * 40)
    by_id = codec.encode(values, inline=False)
    with pytest.raises(UnknownCodecTableError, match=codec.table_id.hex()):
        decode_frame(by_id, values.shape)
    inline = codec.encode(values)
    assert len(by_id) < len(inline)
    np.testing.assert_array_equal(decode_frame(inline, values.shape), _reference(values, codec))
    np.testing.assert_array_equal(decode_frame(by_id, values.shape), _reference(values, codec))


def test_the_tables_held_are_bounded_and_the_least_recently_used_goes() -> None:
    first = ChannelCodec(1, lo=(-128,), hi=(127,), kept=(True,))
    one = _values((1, 2, 1))
    decode_frame(first.encode(one), one.shape)
    for i in range(MAX_TABLES):
        bits, hi = divmod(i, 200)
        other = ChannelCodec(bits + 2, lo=(-128,), hi=(hi - 72,), kept=(True,))
        decode_frame(other.encode(one), one.shape)
    with pytest.raises(UnknownCodecTableError):
        decode_frame(first.encode(one, inline=False), one.shape)


def test_a_frame_claiming_more_than_the_shape_allows_is_refused_before_it_is_decompressed() -> None:
    """A 1 MB body in a tiny frame, for a tensor of 32 bytes: refused on the size it declares."""
    bomb = _frame(bytes(1 << 20))
    assert len(bomb) < 1024
    with pytest.raises(TensorFormatError, match="1,048,576 bytes"):
        decode_frame(bomb, VALUES.shape)


def test_the_registry_decodes_a_calibrated_tensor_and_checks_its_datatype() -> None:
    tensor = WireTensor("x", "INT8", VALUES.shape, CODEC.encode(VALUES), {ENCODING: NAME})
    np.testing.assert_array_equal(decode(tensor), _reference(VALUES, CODEC))
    with pytest.raises(TensorFormatError, match="INT8"):
        decode(WireTensor("x", "UINT8", VALUES.shape, CODEC.encode(VALUES), {ENCODING: NAME}))


def test_bad_codec_parameters_are_refused() -> None:
    with pytest.raises(TensorFormatError, match="1 to 8 bits"):
        ChannelCodec(0, (0,), (1,), (True,))
    with pytest.raises(TensorFormatError, match="lo <= hi"):
        ChannelCodec(2, (5,), (1,), (True,))
    with pytest.raises(TensorFormatError, match="channels"):
        ChannelCodec(2, (0, 0), (1,), (True,))
    with pytest.raises(TensorFormatError, match="int8 tensors of 2 channels"):
        CODEC.encode(np.zeros((1, 3), dtype=np.int8))


# -- calibration ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def halves(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The shipped digits split in two: calibration (with labels, and without) and held out."""
    folder = tmp_path_factory.mktemp("digits")
    sample = models.digits_sample()
    np.savez(folder / "calib.npz", x=sample.x[:100], y=sample.y[:100])
    np.savez(folder / "calib_unlabelled.npz", x=sample.x[:100])
    np.savez(folder / "held.npz", x=sample.x[100:], y=sample.y[100:])
    return folder / "calib.npz", folder / "calib_unlabelled.npz", folder / "held.npz"


@pytest.fixture(scope="module")
def codec_file(halves: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("codec") / "codec.json"
    args = ["codec", "calibrate", "--model", MODEL, "--data", str(halves[0]), "--split-at", str(CUT)]
    assert main([*args, "--max-loss", "1", "--out", str(out)]) == 0
    return out


def _eval(codec: Path, data: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    capsys.readouterr()
    assert main(["codec", "eval", "--codec", str(codec), "--data", str(data), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_calibrated_on_half_the_digits_it_sends_8x_fewer_bytes_on_the_other_half_within_1pp(
    codec_file: Path, halves: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    report = _eval(codec_file, halves[2], capsys)
    assert report["split_point"] == CUT and report["samples"] == 100
    assert report["raw_bytes_per_request"] == GRAPH.cut(CUT).nbytes == 3072
    assert report["raw_bytes_per_request"] / report["bytes_per_request"] >= 8.0
    assert (report["reference_accuracy"] - report["accuracy"]) * 100 <= 1.0
    assert report["lossy_results"] == 100


def test_without_labels_the_loss_is_disagreement_with_the_exact_model(
    halves: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "codec.json"
    args = ["codec", "calibrate", "--model", MODEL, "--data", str(halves[1]), "--split-at", str(CUT)]
    assert main([*args, "--max-loss", "1", "--out", str(out), "--json"]) == 0
    saved = CodecFile.load(out)
    assert not saved.labels and saved.cuts[CUT].chosen is not None
    # Without labels, a point's loss is its disagreement: 100 - agreement, in points.
    for point in saved.cuts[CUT].curve:
        assert point.loss_pp == pytest.approx((1 - point.agreement) * 100, abs=1e-3)
    report = _eval(out, halves[1], capsys)
    assert report["accuracy"] is None and report["agreement"] >= 0.99


def test_the_curve_holds_every_candidate_and_the_choice_is_the_smallest_within_the_loss(
    codec_file: Path,
) -> None:
    saved = CodecFile.load(codec_file)
    cut = saved.cuts[CUT]
    assert len(cut.curve) == 8 * 3 * 3
    within = [p for p in cut.curve if p.within(1.0) and p.bytes < cut.raw_bytes]
    assert all(p.loss_pp <= 1.0 and p.risk_pp <= 1.0 for p in within)
    assert cut.chosen == min(within, key=lambda p: (p.bytes, p.loss_pp))
    assert set(cut.tensors) == set(GRAPH.cut(CUT).names)


def test_the_file_keeps_the_fitted_front_and_another_loss_bound_chooses_from_it(codec_file: Path) -> None:
    """The front holds each setting smaller than every one of less loss, fitted; choosing within a
    bound takes the smallest of them within it, the same as calibrating with that bound would."""
    saved = CodecFile.load(codec_file)
    cut = saved.cuts[CUT]
    costs = [max(p.loss_pp, p.risk_pp) for p, _ in cut.front]
    sizes = [p.bytes for p, _ in cut.front]
    assert len(cut.front) >= 2 and sizes == sorted(sizes) and costs == sorted(costs, reverse=True)
    assert len(set(costs)) == len(costs)
    for p in cut.curve:  # nothing on the curve beats a front point in both
        assert not any(
            p.bytes < q.bytes and max(p.loss_pp, p.risk_pp) <= c
            for (q, _), c in zip(cut.front, costs, strict=True)
        )
    assert (cut.chosen, dict(cut.tensors)) in [(p, dict(t)) for p, t in cut.front]
    for bound in (0.0, 0.5, 1.0, 2.0, 5.0, 10.0):
        again = saved.within(bound).cuts[CUT]
        within = [p for p in cut.curve if p.within(bound) and p.bytes < cut.raw_bytes]
        expected = min(within, key=lambda p: p.bytes) if within else None
        assert again.chosen == expected, bound
        if expected is not None:
            assert again.tensors == fit(
                [_cut_tensors(i) for i in range(100)], expected.bits, expected.clip, expected.drop
            )
    assert saved.within(1.0).to_json() == saved.to_json()
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="a loss bound is a number of points"):
            saved.within(bad)


def test_max_loss_chooses_the_codec_sent_through_a_real_server(
    codec_file: Path,
    halves: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    server: BackgroundServer,
) -> None:
    through = ("--server", server.address)
    tight = _eval(codec_file, halves[2], capsys, *through, "--max-loss", "0")
    loose = _eval(codec_file, halves[2], capsys, *through, "--max-loss", "10")
    default = _eval(codec_file, halves[2], capsys, *through)
    assert tight["bytes_per_request"] > default["bytes_per_request"] >= loose["bytes_per_request"]
    assert tight["lossy_results"] == default["lossy_results"] == loose["lossy_results"] == 100
    assert main(["codec", "eval", "--codec", "zstd", "--data", str(halves[2]), "--max-loss", "1"]) == 2
    assert "--max-loss chooses among a calibrated codec's settings" in capsys.readouterr().err
    plans = []
    for bound in ("0", "1"):
        capsys.readouterr()
        argv = ["plan", MODEL, "--server", server.address, "--codec", str(codec_file), "--max-loss", bound]
        assert main([*argv, "--json"]) == 0
        plans.append(json.loads(capsys.readouterr().out))
    assert [p["codec_max_loss_pp"] for p in plans] == [0.0, 1.0]
    assert all(p["codec_file"] == str(codec_file) for p in plans)
    ratio = [next(c["codec_ratio"] for c in p["cuts"] if c["index"] == CUT) for p in plans]
    assert ratio[0] > ratio[1]  # 2 bits a value within 0 pp, 1 bit within 1 pp


def test_calibrate_searches_the_cuts_listed_and_names_the_smallest(
    halves: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "codec.json"
    args = ["codec", "calibrate", "--model", MODEL, "--data", str(halves[0]), "--split-at", "15, 12,15"]
    assert main([*args, "--max-loss", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    saved = CodecFile.load(out)
    assert sorted(saved.cuts) == [12, 15]
    smallest = min(saved.cuts.values(), key=lambda c: c.chosen.bytes if c.chosen else np.inf)
    assert saved.chosen == smallest.split_point


def test_calibrate_auto_searches_every_cut_that_sends_int8_feature_maps_the_input_included(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a slow device the best lossy plan may send the input itself, coded (shapes128 at 4,096x)."""
    from edge.codec import calibratable

    graph = ModelGraph.from_file(models.model_path("digits_tiny"))
    sample = models.digits_sample()
    np.savez(tmp_path / "calib.npz", x=sample.x[:40], y=sample.y[:40])
    out = tmp_path / "codec.json"
    args = ["codec", "calibrate", "--model", "digits_tiny", "--data", str(tmp_path / "calib.npz")]
    assert main([*args, "--split-at", "auto", "--max-loss", "1", "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    expected = [k for k in range(graph.num_operators + 1) if calibratable(graph, k) is None]
    assert 0 in expected and sorted(CodecFile.load(out).cuts) == expected


def test_calibrate_draws_the_rate_loss_plot(halves: tuple[Path, Path, Path], tmp_path: Path) -> None:
    png = tmp_path / "codec.png"
    args = ["codec", "calibrate", "--model", MODEL, "--data", str(halves[0]), "--split-at", "15"]
    assert main([*args, "--max-loss", "1", "--out", str(tmp_path / "c.json"), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_codec_applies_only_to_its_model_and_cuts(codec_file: Path) -> None:
    saved = CodecFile.load(codec_file)
    tensor = GRAPH.cut(CUT).tensors[0]
    wire = encode(tensor.name, np.zeros(tensor.shape, dtype=np.int8))
    sent, table = saved.compress(wire, CUT, GRAPH.sha256, ())
    assert sent.parameters[ENCODING] == NAME and table == saved.cuts[CUT].tensors[tensor.name].table_id
    again, none = saved.compress(wire, CUT, GRAPH.sha256, {table})
    assert none is None and again.nbytes < sent.nbytes  # by id, once the receiver holds the table
    assert saved.compress(wire, CUT - 1, GRAPH.sha256, ()) == (wire, None)  # no codec for that cut
    assert saved.compress(wire, CUT, "0" * 64, ()) == (wire, None)  # another model
    other = ModelGraph.from_file(models.model_path("digits_tiny"))
    with pytest.raises(ConfigError, match="calibrated for another model"):
        saved.check_model(other)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("not json", "not JSON"),
        ('{"format": "other"}', "not a codec file"),
        ('{"format": "edge-feature-codec/1"}', "malformed"),
    ],
)
def test_a_bad_codec_file_is_one_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "codec.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        CodecFile.load(path)


def test_calibrate_refuses_a_cut_that_sends_no_int8_feature_map() -> None:
    graph = ModelGraph.from_file(models.model_path("digits_resnet_f32"))
    with ModelRunner(graph) as runner, pytest.raises(Exception, match="not an int8 feature map"):
        calibrate(runner, [{}] * 4, None, [3], max_loss_pp=1.0)


def test_fit_drops_channels_that_never_vary() -> None:
    samples = [{"t": np.stack([_values((4, 4), s)[:, 0], np.full(4, 7, np.int8)], axis=-1)} for s in range(3)]
    codec = fit(samples, 2, 0.0, 0.0)["t"]
    assert codec.kept == (True, False) and codec.lo[1] == codec.hi[1] == 7


# -- through a real server ------------------------------------------------------------------------


def _cut_tensors(index: int) -> dict[str, np.ndarray]:
    with ModelRunner(GRAPH) as runner:
        return runner.run_head(CUT, {GRAPH.inputs[0].name: models.digits_sample().x[index : index + 1]}).cut


def test_through_a_real_server_the_result_is_flagged_and_equals_the_tail_on_the_decoded_tensors(
    codec_file: Path,
) -> None:
    saved = CodecFile.load(codec_file)
    params: dict[str, str | int] = {SPLIT_POINT: CUT, MODEL_SHA256: GRAPH.sha256}
    with BackgroundServer.from_files([models.model_path(MODEL)]) as server, ModelRunner(GRAPH) as runner:
        with TailClient(server.address, codec=saved) as client:
            sizes = []
            for index in range(5):
                cut = _cut_tensors(index)
                result = client.infer(MODEL, cut, parameters=params)
                inline = {n: saved.cuts[CUT].tensors[n].encode(v) for n, v in cut.items()}
                by_id = {n: saved.cuts[CUT].tensors[n].encode(v, inline=False) for n, v in cut.items()}
                decoded = {n: decode_frame(inline[n], v.shape) for n, v in cut.items()}
                expected = runner.run_tail(CUT, decoded)
                assert result.lossy
                # The first request carries each codec table; the server holds them, and the next name them.
                assert result.bytes_sent == sum(map(len, (inline if index == 0 else by_id).values()))
                sizes.append(result.bytes_sent)
                assert set(result.outputs) == set(expected)
                for name in expected:
                    np.testing.assert_array_equal(result.outputs[name], expected[name])
    assert sizes[0] > max(sizes[1:])


def test_a_restarted_server_is_sent_the_tables_again_and_no_request_falls_back(
    codec_file: Path, tmp_path: Path
) -> None:
    """A server in a process of its own: a restart loses the tables it held. The next request is
    refused FAILED_PRECONDITION, and the client sends it again with the tables (infer); a pipelined
    request (submit) falls back once, and the next carries them."""
    saved = CodecFile.load(codec_file)
    params: dict[str, str | int] = {SPLIT_POINT: CUT, MODEL_SHA256: GRAPH.sha256}
    args = [
        sys.executable,
        "-m",
        "server",
        "--models",
        str(models.model_path(MODEL).parent),
        "--host",
        "127.0.0.1",
    ]
    with RefusedAddress() as held:
        port = held.release()
        proc, _ = start_logged([*args, "--port", str(port)], tmp_path / "one.log")
        with TailClient(held.address, codec=saved, timeout_s=10.0) as client:
            try:
                first = client.infer(MODEL, _cut_tensors(0), parameters=params)
                second = client.infer(MODEL, _cut_tensors(1), parameters=params)
                assert first.bytes_sent > second.bytes_sent
            finally:
                proc.kill()
                proc.wait(10)
            proc, _ = start_logged([*args, "--port", str(port)], tmp_path / "two.log")
            try:
                again = client.infer(MODEL, _cut_tensors(2), parameters=params)  # refused, then sent again
                assert again.bytes_sent > second.bytes_sent  # with the tables
                later = client.infer(MODEL, _cut_tensors(3), parameters=params)
                assert later.bytes_sent < again.bytes_sent  # by id again
            finally:
                proc.kill()
                proc.wait(10)
            proc, _ = start_logged([*args, "--port", str(port)], tmp_path / "three.log")
            try:
                with pytest.raises(RemoteError, match="unknown codec table") as refused:
                    client.submit(MODEL, _cut_tensors(4), parameters=params).result(10)
                assert refused.value.status == "FAILED_PRECONDITION"
                resent = client.submit(MODEL, _cut_tensors(5), parameters=params).result(10)
                assert resent.bytes_sent > second.bytes_sent
            finally:
                proc.kill()
                proc.wait(10)


def test_a_server_that_does_not_list_the_codec_gets_raw_tensors_and_answers_exactly(codec_file: Path) -> None:
    saved = CodecFile.load(codec_file)
    dataplane = DataPlane(ModelRepository.from_files([models.model_path(MODEL)]), codecs=("zstd",))
    params: dict[str, str | int] = {SPLIT_POINT: CUT, MODEL_SHA256: GRAPH.sha256}
    with BackgroundServer(EdgeServer(dataplane)) as server, ModelRunner(GRAPH) as runner:
        with TailClient(server.address, codec=saved) as client:
            cut = _cut_tensors(0)
            result = client.infer(MODEL, cut, parameters=params)
            assert not result.lossy and result.bytes_sent == 3072
            expected = runner.run({GRAPH.inputs[0].name: models.digits_sample().x[:1]})
            for name in result.outputs:
                np.testing.assert_array_equal(result.outputs[name], expected[name])


def test_outputs_never_come_back_through_the_calibrated_codec(server: BackgroundServer) -> None:
    whole = GRAPH.inputs[0]
    with TailClient(server.address) as client:
        result = client.infer(
            MODEL,
            {whole.name: models.digits_sample().x[:1]},
            parameters={ACCEPT_ENCODING: NAME},
        )
    with ModelRunner(GRAPH) as runner:
        expected = runner.run({whole.name: models.digits_sample().x[:1]})
    for name in expected:
        np.testing.assert_array_equal(result.outputs[name], expected[name])


# -- in a device profile ------------------------------------------------------------------------


def _profile(folder: Path, codec: str) -> Path:
    from helpers import MINIMAL_PROFILE

    path = folder / "device.toml"
    path.write_text(
        MINIMAL_PROFILE.replace("k = 8", f"k = {CUT}")
        + f'[[edge.servers]]\naddress = "127.0.0.1:1"\ncodec = "{codec}"\n'
    )
    return path


def test_a_profile_names_a_codec_file_beside_it(
    codec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "codecs").mkdir()
    (tmp_path / "codecs" / "digits.json").write_bytes(codec_file.read_bytes())
    profile = _profile(tmp_path, "codecs/digits.json")
    monkeypatch.chdir(Path(profile.anchor))  # resolved beside the profile, not the working directory
    assert main(["run", "--config", str(profile), "--check"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("codec", "needle"),
    [
        ("nowhere.json", "edge.servers[0].codec: "),
        ("gzip", "edge.servers[0].codec: choose one of raw, zstd"),
        ("other-model.json", "edge.servers[0].codec: "),
    ],
)
def test_a_bad_codec_in_a_profile_is_one_line(
    codec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], codec: str, needle: str
) -> None:
    body = json.loads(codec_file.read_text())
    body["model_sha256"] = "0" * 64
    (tmp_path / "other-model.json").write_text(json.dumps(body))
    profile = _profile(tmp_path, codec)
    assert main(["run", "--config", str(profile), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_a_profile_bounds_a_codec_files_loss_and_max_loss_needs_a_file(
    codec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.daemon import profiles
    from edge.daemon.device import resolve

    (tmp_path / "digits.json").write_bytes(codec_file.read_bytes())
    profile = _profile(tmp_path, "digits.json")
    profile.write_text(profile.read_text() + "max_loss = 0\n")
    assert main(["run", "--config", str(profile), "--check"]) == 0, capsys.readouterr().err
    (codec,) = resolve(profiles.load(profile), profile).codecs
    assert isinstance(codec, CodecFile)
    assert codec.cuts[CUT].chosen == CodecFile.load(codec_file).within(0).cuts[CUT].chosen
    assert codec.cuts[CUT].chosen != CodecFile.load(codec_file).cuts[CUT].chosen
    zstd = _profile(tmp_path, "zstd")
    zstd.write_text(zstd.read_text() + "max_loss = 0\n")
    assert main(["run", "--config", str(zstd), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_loss chooses among a calibrated codec's settings" in err, err


def test_the_tables_held_are_bounded_in_bytes_too() -> None:
    """Tables of 65,535 channels (128 KiB each): fewer than MAX_TABLES of them pass MAX_TABLE_BYTES."""
    from edge.wire.calibrated import MAX_TABLE_BYTES

    wide = _values((1, 65535))
    codecs = [
        ChannelCodec(1, lo=(-128,) * 65535, hi=(i - 100,) * 65535, kept=(True,) * 65535) for i in range(130)
    ]
    assert len(codecs) < MAX_TABLES and len(codecs) * len(codecs[0].table) > MAX_TABLE_BYTES
    for codec in codecs:
        decode_frame(codec.encode(wide), wide.shape)
    with pytest.raises(UnknownCodecTableError):
        decode_frame(codecs[0].encode(wide, inline=False), wide.shape)
    decode_frame(codecs[-1].encode(wide, inline=False), wide.shape)  # the newest is held


# -- a trained model beyond digits --------------------------------------------------------------


def test_on_the_shapes_model_it_sends_4x_fewer_bytes_on_held_out_shapes_within_1pp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """shapes_cnn (colour shapes on noise, 8 classes, 96.75 % held out): calibrated on 300 shapes drawn
    from the held-out seed, measured on 500 others from it; neither set was trained on."""
    sys.path.insert(0, str(REPO / "tools"))
    import shapes_data

    graph = ModelGraph.from_file(models.model_path("shapes_cnn"))
    quantization = graph.inputs[0].quantization
    assert quantization is not None
    scale, zero_point = quantization
    x, y = shapes_data.make(800, 20240614)
    codes = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)
    np.savez(tmp_path / "calib.npz", x=codes[:300], y=y[:300])
    np.savez(tmp_path / "held.npz", x=codes[300:], y=y[300:])
    out = tmp_path / "shapes.json"
    args = ["codec", "calibrate", "--model", "shapes_cnn", "--data", str(tmp_path / "calib.npz")]
    assert main([*args, "--split-at", "18", "--max-loss", "1", "--out", str(out), "--json"]) == 0
    report = _eval(out, tmp_path / "held.npz", capsys)
    assert report["samples"] == 500 and report["raw_bytes_per_request"] == 6144
    assert report["raw_bytes_per_request"] / report["bytes_per_request"] >= 4.0
    assert (report["reference_accuracy"] - report["accuracy"]) * 100 <= 1.0
    assert report["reference_accuracy"] > 0.9  # a trained model: the loss means something


def test_mutated_frames_are_refused_or_decoded_to_the_shape_never_more() -> None:
    """Two thousand frames with random bytes changed, cut or added: each is one TensorFormatError, or
    an int8 array of exactly the tensor's shape."""
    rng = np.random.default_rng(7)
    values = _values((1, 6, 6, 8))
    codec = ChannelCodec(3, lo=(-60,) * 8, hi=(60,) * 8, kept=(True,) * 7 + (False,))
    frames = [codec.encode(values), codec.encode(values, inline=False), _frame(_body(codec, values))]
    outcomes = {"refused": 0, "decoded": 0}
    for i in range(2000):
        frame = bytearray(frames[i % len(frames)])
        for _ in range(int(rng.integers(1, 4))):
            what = int(rng.integers(0, 3))
            at = int(rng.integers(0, len(frame)))
            if what == 0:
                frame[at] = int(rng.integers(0, 256))
            elif what == 1:
                del frame[at:]
            else:
                frame[at:at] = rng.bytes(int(rng.integers(1, 64)))
            if not frame:
                frame = bytearray(b"\0")
        try:
            decoded = decode_frame(bytes(frame), values.shape)
        except TensorFormatError:
            outcomes["refused"] += 1
        else:
            assert decoded.dtype == np.int8 and decoded.shape == values.shape
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 1000  # most mutations break the frame, and each says so


def test_a_pool_plans_with_the_codec_its_servers_share(codec_file: Path) -> None:
    from edge.transport import FailoverClient

    with RefusedAddress() as one, RefusedAddress() as two:
        same = [TailClient(a.address, codec=CodecFile.load(codec_file)) for a in (one, two)]
        with FailoverClient(same) as pool:
            assert pool.cut_encoder == CodecFile.load(codec_file)
        mixed = [TailClient(one.address, codec=CodecFile.load(codec_file)), TailClient(two.address)]
        with FailoverClient(mixed) as pool:
            assert pool.cut_encoder is None


def test_an_out_path_that_cannot_be_written_is_one_line(
    halves: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was a traceback, after the search."""
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "codec.json"
    args = ["codec", "calibrate", "--model", MODEL, "--data", str(halves[0]), "--split-at", "15"]
    assert main([*args, "--max-loss", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {out}" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["codec", "eval", "--codec", "zstd", "--data", "x.npz"], "edge codec eval needs --codec CODEC.json"),
        (
            ["codec", "calibrate", "--model", "digits_resnet_f32", "--split-at", "8"],
            "not an int8 feature map",
        ),
        (["codec", "calibrate", "--model", MODEL, "--split-at", "12,99"], "cut 99 is out of range"),
    ],
)
def test_codec_commands_refuse_what_they_cannot_do_in_one_line(
    argv: list[str],
    needle: str,
    halves: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra = ["--data", str(halves[0]), "--max-loss", "1", "--out", str(tmp_path / "c.json")]
    assert main(argv + (extra if argv[1] == "calibrate" else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize(("mbit", "lossy"), [(10_000.0, False), (1.0, True)])
def test_the_planner_sends_a_cut_through_the_codec_only_where_it_pays(
    codec_file: Path, mbit: float, lossy: bool
) -> None:
    """A device whose profiles make cut 12 the only good one (its head free, every later head and
    every earlier tail 50 ms), planning with the calibrated codec's real ratios and times: on a fast
    link the codec does not beat the raw cut by the margin, and requests go raw, exactly the whole
    model's outputs; at 1 Mbit/s it does, and they go coded, flagged lossy. Through a real server."""
    from edge.autosplit import AutoSplit
    from edge.cooperative import CooperativeRunner
    from edge.link import LinkEstimator
    from edge.profiler import codec_profile

    n = GRAPH.num_operators
    head = [0.0 if k <= CUT else 50.0 for k in range(n + 1)]
    tail = [50.0 if k < CUT else 1.0 for k in range(n)] + [0.0]
    link = LinkEstimator()
    link.observe_rtt(1.0)
    for k in (0, CUT) * 3:
        sent = GRAPH.cut(k).nbytes + sum(t.nbytes for t in GRAPH.cut(k).tail_outputs)
        link.observe_transfer(sent, 1.0 + sent / (mbit * 125.0))
    digits = models.digits_sample().x
    with BackgroundServer.from_files([models.model_path(MODEL)]) as server, ModelRunner(GRAPH) as runner:
        with TailClient(server.address, codec=CodecFile.load(codec_file)) as client:
            policy = AutoSplit(GRAPH, head, tail, estimator=link, reachable=True, explore_every=0)
            policy.use_codec("calibrated", *codec_profile(runner, "calibrated", encoder=client.cut_encoder))
            device = CooperativeRunner(runner, client, model_name=MODEL, policy=policy)
            for i in range(3):
                x = {GRAPH.inputs[0].name: digits[i : i + 1]}
                result = device.infer(x)
                assert (result.split_point, result.fallback, result.lossy) == (CUT, False, lossy)
                assert policy.coded(CUT) is lossy
                if not lossy:
                    whole = runner.run(x)
                    assert all(np.array_equal(result.outputs[name], whole[name]) for name in whole)


def test_slow_link_sets_the_lossy_plan_against_the_best_measured_lossless_cut(tmp_path: Path) -> None:
    """bench/slow_link.py on the committed shapes128 sweeps: the lossless figure is the fastest fully
    measured cut of either lossless run, the lossy one the measured time of the planner's choice."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slow_link", REPO / "bench" / "slow_link.py")
    assert spec is not None and spec.loader is not None
    slow_link = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slow_link)
    results = REPO / "bench" / "results"
    lossless = [results / "shapes128_raw.json", results / "shapes128_zstd.json"]
    rows = slow_link.compare(lossless, results / "shapes128_calibrated.json")
    runs = [json.loads(path.read_text()) for path in lossless]
    lossy = json.loads((results / "shapes128_calibrated.json").read_text())
    assert [r["scenario"] for r in rows] == [s["key"] for s in lossy["scenarios"]]
    for row, scenario in zip(rows, lossy["scenarios"], strict=True):
        measured = [
            (c["median_ms"], c["index"])
            for run in runs
            for s in run["scenarios"]
            if s["key"] == row["scenario"]
            for c in s["result"]["cuts"]
            if not c["pruned"] and not c["fallbacks"]
        ]
        assert (row["lossless_best_ms"], row["lossless_best_cut"]) == min(
            (round(ms, 2), k) for ms, k in measured
        )
        chosen = next(c for c in scenario["result"]["cuts"] if c["index"] == scenario["result"]["choice"])
        assert row["lossy_choice_ms"] == round(chosen["median_ms"], 2)
        assert abs(row["speedup"] - row["lossless_best_ms"] / row["lossy_choice_ms"]) < 1e-3
    other = json.loads(lossless[0].read_text())
    other["model"] = "another"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="measured another"):
        slow_link.compare([tmp_path / "other.json"], results / "shapes128_calibrated.json")
