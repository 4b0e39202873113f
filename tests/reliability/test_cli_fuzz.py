"""CLI fuzz: every numeric option of every command, found by introspecting the click commands (so
options added later are covered too), is tried with values just outside its declared range, wrong
types and extremes. Each must be refused by click before any work: exit 2, one line naming the
option, no traceback, no --out folder or store created. An option without a declared range fails
the test unless it is on the commented allow-list below. The commands' bodies are replaced by a
tripwire, so a value that gets past click is caught without running the work it would start.

In process with click's runner and otherwise-valid minimal arguments (the tiny teacher, a tiny
shard), so what is tested is the range check; the whole sweep takes a few seconds.
"""
from __future__ import annotations

import math

import click
import pytest

from relhelp import TEACHER_ARGS, invoke, noise_shards

# options whose every value of their type is legal (none today): name -> why
UNBOUNDED_OK: dict[str, str] = {}

EXTREMES = ["2**70", str(2**70), str(-2**70), "1e309", "-1e309", "nan", "inf", "-inf", "-0", "x", "", "1.5", "0x10"]


def walk(command: click.Command, path: tuple[str, ...] = ()):
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from walk(sub, path + (name,))
    else:
        yield path, command


def numeric_options():
    from attncache.cli.main import cli

    for path, command in walk(cli):
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag:
                continue
            types = param.type.types if isinstance(param.type, click.Tuple) else [param.type]
            if all(isinstance(t, (click.types.IntParamType, click.types.FloatParamType)) for t in types):
                yield path, param, types


class Reached(Exception):
    """The command's body was entered: click let the value through."""


@pytest.fixture
def tripwire(monkeypatch):
    from attncache.cli.main import cli

    def body(**kwargs):
        raise Reached()

    for _, command in walk(cli):
        monkeypatch.setattr(command, "callback", body)


def _is_int(param_type) -> bool:
    return isinstance(param_type, click.types.IntParamType)


def legal(param_type, text: str) -> bool:
    """Whether `text` is a value the declared type accepts (then it is not tried: it would run)."""
    try:
        value = int(text, 10) if _is_int(param_type) else float(text)
    except ValueError:
        return False
    if not _is_int(param_type) and not math.isfinite(value):
        return False
    low, high = getattr(param_type, "min", None), getattr(param_type, "max", None)
    if low is not None and (value < low or (param_type.min_open and value == low)):
        return False
    if high is not None and (value > high or (param_type.max_open and value == high)):
        return False
    return True


def probes(param_type) -> list[str]:
    """Just below and above the range, then wrong types and extremes."""
    low, high = getattr(param_type, "min", None), getattr(param_type, "max", None)
    step = 1 if _is_int(param_type) else 1e-9 * max(1.0, abs(high or 1.0))
    out = []
    if low is not None:
        out.append(str(low - step) if not param_type.min_open else repr(float(low)))
    if high is not None:
        out.append(str(high + step) if not param_type.max_open else repr(float(high)))
    return out + EXTREMES


@pytest.fixture(scope="module")
def base_args(tmp_path_factory):
    """Otherwise-valid minimal arguments of each command, so only the value under test is wrong."""
    tmp = tmp_path_factory.mktemp("fuzz")
    data = noise_shards(tmp / "d", 4, shard_size=4)
    store, run = str(tmp / "s.zarr"), str(tmp / "run")
    args = {
        ("precompute",): ["--data", data, *TEACHER_ARGS, "--out", store, "--ray", "none", "--quiet"],
        ("train",): ["--data", data, "--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32",
                     "--mode", "scratch", "--out", run, "--max-steps", "1", "--quiet"],
        ("evaluate",): [str(tmp), "--data", data],
        ("verify",): [store],
        ("inspect",): [store],
        ("show",): [store, "--key", "s0000000", "--out", str(tmp / "x.png")],
        ("plan",): [*TEACHER_ARGS[:2], "--samples", "10"],
        ("data", "synth"): [str(tmp / "synth")],
        ("data", "pack"): [str(tmp / "d"), str(tmp / "packed")],
        ("teacher", "pretrain"): ["--data", data, "--out", str(tmp / "teacher")],
        ("demo",): ["--out", str(tmp / "demo")],
        ("repro",): ["--out", str(tmp / "repro")],
        ("bench", "fidelity"): [TEACHER_ARGS[1], *TEACHER_ARGS[2:], "--data", data],
    }
    return tmp, args


def test_every_numeric_option_declares_a_bounded_range():
    """A numeric option without bounds takes 2**70 or inf; the ranges also show in --help."""
    unbounded = []
    for path, param, types in numeric_options():
        name = f"{' '.join(path)} {param.opts[0]}"
        for t in types:
            if name in UNBOUNDED_OK:
                continue
            if not isinstance(t, click.types._NumberRangeBase) or t.min is None or t.max is None:
                unbounded.append(name)
            elif not _is_int(t) and legal(t, "nan"):
                unbounded.append(name + " (takes nan)")
    assert not unbounded, f"numeric options without a declared range: {unbounded}"
    assert len(list(numeric_options())) >= 80  # the sweep really covers the commands


def test_every_numeric_option_refuses_nonsense_before_any_work(base_args, tripwire):
    tmp, args = base_args
    before = sorted(p.name for p in tmp.iterdir())
    tried, failures = 0, []
    for path, param, types in numeric_options():
        base = args.get(path)
        assert base is not None, f"no minimal arguments for command {' '.join(path)}: add it to base_args"
        for slot, param_type in enumerate(types):
            for bad in probes(param_type):
                if legal(param_type, bad):
                    continue
                value = ["0.2"] * len(types)
                value[slot] = bad
                result = invoke(*path, *base, param.opts[0], *value)
                tried += 1
                lines = result.output.strip().splitlines()
                problem = None
                if isinstance(result.exception, Reached):
                    problem = "accepted: the command would have started its work"
                elif result.exit_code == 0:
                    problem = "exit 0"
                elif "Traceback" in result.output or not isinstance(result.exception, SystemExit):
                    problem = f"traceback ({type(result.exception).__name__})"
                elif result.exit_code != 2 or f"Invalid value for '{param.opts[0]}'" not in result.output:
                    problem = f"exit {result.exit_code}, not click's range refusal"
                elif len([ln for ln in lines if ln.startswith("Error:")]) != 1:
                    problem = "not one error line"
                if problem:
                    failures.append(f"{' '.join(path)} {param.opts[0]} {bad!r}: {problem}: {lines[-1:]}")
    assert tried >= 800, tried
    assert not failures, f"{len(failures)} of {tried} nonsense values not refused:\n" + "\n".join(failures[:40])
    assert sorted(p.name for p in tmp.iterdir()) == before, "a refused command created its --out"
