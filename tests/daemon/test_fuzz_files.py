"""Fuzzing the files a user hands the device: 300 mutated device profiles and 300 mutated calibration
files, seeded, each either accepted or refused with one ConfigError (one line); no other exception,
no hang. Mutations: bytes flipped, inserted or deleted, lines duplicated or dropped, numbers pushed
to extremes (huge, negative, NaN, Infinity), strings given newlines and control characters."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from edge.cascade import Calibration
from edge.daemon.device import resolve
from edge.daemon.profiles import load
from edge.errors import ConfigError, EdgeError
from helpers import REPO

PROFILE = (REPO / "firmware_config" / "generic-x86.toml").read_text()
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
_EXTREMES = ["1e309", "-1", "0", "99999999999999999999", "nan", "inf", "-0.0", "1e-320"]


def _mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and text:
            i = rng.randrange(len(text))
            text = text[:i] + chr(rng.randrange(0, 256)) + text[i + 1 :]
        elif kind == 1:
            i = rng.randrange(len(text) + 1)
            text = text[:i] + rng.choice(["\n", "\x00", "\\n", '"', "[", "{", "\u2028", "é"]) + text[i:]
        elif kind == 2 and text:
            i = rng.randrange(len(text))
            text = text[:i] + text[i + rng.randint(1, 20) :]
        elif kind == 3:
            lines = text.splitlines()
            if lines:
                i = rng.randrange(len(lines))
                lines.insert(i, lines[i]) if rng.random() < 0.5 else lines.pop(i)
            text = "\n".join(lines)
        elif kind == 4:
            numbers = list(_NUMBER.finditer(text))
            if numbers:
                m = rng.choice(numbers)
                text = text[: m.start()] + rng.choice(_EXTREMES) + text[m.end() :]
        else:
            text = (
                text.replace('"', '"\\n', 1)
                if rng.random() < 0.5
                else text + "\n" + "x" * rng.randint(1, 70_000)
            )
    return text


@pytest.mark.parametrize("batch", range(6))
def test_mutated_profiles_are_accepted_or_one_config_error(batch: int, tmp_path: Path) -> None:
    rng = random.Random(1000 + batch)
    outcomes = {"accepted": 0, "refused": 0}
    for i in range(50):
        path = tmp_path / f"p{i}.toml"
        path.write_text(_mutate(PROFILE, rng), errors="surrogateescape")
        try:
            resolve(load(path), path)
        except ConfigError as err:
            assert "\n" not in str(err).strip(), str(err)[:300]
            outcomes["refused"] += 1
        except EdgeError as err:  # a model or cut error names its problem too, in one line
            assert "\n" not in str(err).strip(), str(err)[:300]
            outcomes["refused"] += 1
        else:
            outcomes["accepted"] += 1
    assert sum(outcomes.values()) == 50 and outcomes["refused"] > 0, outcomes


def _calibration(tmp_path: Path) -> str:
    from edge import models
    from edge.cli import main

    out = tmp_path / "cal.json"
    data = models.HERE / "digits_test.npz"
    argv = ["calibrate", "--model", "digits_resnet", "--small", "digits_tiny", "--split-at", "8"]
    assert main([*argv, "--data", str(data), "--local-share", "0.9", "--out", str(out), "--json"]) == 0
    return out.read_text()


def test_mutated_calibrations_are_accepted_or_one_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _calibration(tmp_path)
    capsys.readouterr()
    rng = random.Random(7)
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(300):
        try:
            Calibration.from_json(_mutate(good, rng), "fuzz.json")
        except ConfigError as err:
            assert str(err).startswith("fuzz.json"), str(err)[:300]
            outcomes["refused"] += 1
        else:
            outcomes["accepted"] += 1
    assert sum(outcomes.values()) == 300 and outcomes["refused"] > 100, outcomes
