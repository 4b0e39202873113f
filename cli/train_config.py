"""`train -c FILE.yaml`: option values from a YAML file, as timm's train.py reads its `-c/--config`.

Why click's `default_map`: the file's values become the command's defaults, so an option typed on
the command line overrides the file, and every value still goes through the option's own type and
callback (the same range check, the same one-line error as on the command line). Keys are the
options' long names with dashes or underscores (`batch_size: 64`, `student-arg: [depth=4]`), our
spellings or timm's aliases (timm's train.py keys are its option dests: `aa`, `reprob`, `amp: true`,
`model_kwargs: {depth: 4}`); a key that names no option is refused in one line naming it and the
file. A name without a path and without `.yaml` (`-c paper-distill`) is one of the recipes shipped
in cli/configs/. Only PyYAML is imported (no torch), so `--help` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

CONFIG_DIR = Path(__file__).parent / "configs"


def shipped() -> list[str]:
    """Names of the recipes shipped with the package (cli/configs/*.yaml, without .yaml)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve(value: str) -> Path:
    """A YAML file's path, or a shipped recipe's name; anything else is refused in one line."""
    path = Path(value)
    if path.is_file():
        return path
    if "/" not in value and not path.suffix and (CONFIG_DIR / f"{value}.yaml").is_file():
        return CONFIG_DIR / f"{value}.yaml"
    raise click.BadParameter(f"{value!r} is neither a file nor a shipped recipe ({', '.join(shipped())})")


def option_keys(command: click.Command, skip: str) -> dict[str, str]:
    """Every key a config may use -> the parameter it sets: each long option name, with - or _."""
    keys = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in (skip, "help"):
            continue
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("--"):
                keys[opt[2:]] = keys[opt[2:].replace("-", "_")] = param.name
    return keys


def read(path: Path, command: click.Command, skip: str) -> dict:
    """The file's values keyed by parameter name (click's default_map), or a one-line refusal."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"{path}: not a readable YAML file ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise click.BadParameter(f"{path}: a config is a mapping of option names to values, "
                                 f"got a {type(loaded).__name__}")
    keys, out = option_keys(command, skip), {}
    for key, value in loaded.items():
        name = keys.get(str(key))
        if name is None:
            raise click.BadParameter(f"{path}: unknown key {key!r}: `{command.name}` has no option "
                                     f"--{str(key).replace('_', '-')}")
        if name in out:
            raise click.BadParameter(f"{path}: key {key!r} sets --{name.replace('_', '-')} a second time")
        multiple = next(p for p in command.params if p.name == name).multiple
        if multiple and isinstance(value, dict):  # timm's `model_kwargs: {depth: 4}`: K=V pairs
            value = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
        out[name] = list(value) if multiple and isinstance(value, (list, tuple)) else [value] if multiple else value
    return out


def _callback(ctx: click.Context, param: click.Parameter, value):
    if value is None:
        return
    values = read(resolve(value), ctx.command, param.name)
    ctx.default_map = {**(ctx.default_map or {}), **values}


def config_option(command):
    """Decorate a click command with `-c/--config` (eager: it runs before the options it fills)."""
    return click.option(
        "-c", "--config", "config", default=None, is_eager=True, expose_value=False, callback=_callback,
        metavar="FILE|NAME",
        help="YAML of option values (keys: option names, e.g. `batch_size: 64`, `student_arg: [depth=4]`), "
             f"or a shipped recipe by name: {', '.join(shipped())}. Options given on the command line "
             "override the file's.")(command)
