"""Entry point of the `attncache` console script."""
import sys

import click

from attncache.cli.bench_cmd import bench
from attncache.cli.cache_cmd import inspect, precompute, show, verify
from attncache.cli.compare_cmd import compare
from attncache.cli.data_cmd import data
from attncache.cli.demo_cmd import demo
from attncache.cli.errors import os_error_line
from attncache.cli.plan_cmd import plan
from attncache.cli.repro_cmd import repro
from attncache.cli.teacher_cmd import teacher
from attncache.cli.train_cmd import evaluate, train

# errors that are about the user's input, not bugs: one line naming file, key and cause, exit 1.
# Named by the module that defines each class, not imported: importing them would load torch, timm
# and Ray before `--help` could answer (issue 16 item 6).
USER_ERRORS = (("attncache.pipeline.data.errors", "BadSample"), ("attncache.pipeline.data.errors", "DataError"),
               ("attncache.pipeline.precompute.job", "TooManySkipped"), ("attncache.pipeline.store.meta", "StoreError"),
               ("attncache.storage_schema", "SchemaError"), ("attncache.pipeline.teacher.loading", "TeacherError"),
               ("attncache.pipeline.precompute.ray_runner", "UnitsFailed"),
               ("attncache.pipeline.precompute.ray_runner", "ClusterTooSmall"),
               ("attncache.pipeline.train.student", "StudentMismatch"),
               ("attncache.pipeline.studies.pretrain_data", "PretrainError"),
               ("attncache.pipeline.train.checkpoint", "TrainError"), ("attncache.pipeline._util.spec_error", "SpecError"),
               ("attncache.pipeline.tools.plan", "PlanError"), ("attncache.pipeline.train.distributed", "LaunchError"),
               ("attncache.pipeline.encodings.finite", "NonFiniteFactors"))


def user_errors() -> tuple[type[Exception], ...]:
    """The USER_ERRORS classes whose modules are imported: an error can only have been raised from a
    class whose module was loaded, so the others need not be (and are not) imported to be told apart."""
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            line = one_line(exc)
            if line is None:
                raise
            raise click.ClickException(line) from exc


def one_line(exc: Exception) -> str | None:
    """The one line that shows an error of the user's input or machine, or None for a bug (its traceback stays)."""
    if isinstance(exc, user_errors()):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TypeError):  # timm's create_model given a --model-arg/--student-arg key it does not take
        if "unexpected keyword argument" not in str(exc):
            return None
        return (f"TypeError: {exc}: a --model-arg or --student-arg key the timm model does "
                "not take; see the model's constructor for its arguments")
    if isinstance(exc, OSError):  # a full disk, a read-only store, a path that is a file: the machine, not a bug
        if isinstance(exc, BrokenPipeError) or exc.errno is None:
            return None
        return os_error_line(exc)
    return None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="attncache")
def cli() -> None:
    """attncache: precompute a teacher ViT's attention once, train students from the cache."""


for command in (data, teacher, precompute, verify, inspect, show, demo, repro, plan, bench, train, evaluate, compare):
    cli.add_command(command)


if __name__ == "__main__":
    cli()
