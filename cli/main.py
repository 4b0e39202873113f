"""Entry point of the `attncache` console script."""
import click

from attncache.cli.bench_cmd import bench
from attncache.cli.cache_cmd import inspect, precompute, show, verify
from attncache.cli.data_cmd import data
from attncache.cli.demo_cmd import demo
from attncache.cli.errors import os_error_line
from attncache.cli.plan_cmd import plan
from attncache.cli.repro_cmd import repro
from attncache.cli.teacher_cmd import teacher
from attncache.cli.train_cmd import evaluate, train
from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.data.shards import BadSample, DataError
from attncache.pipeline.encodings.finite import NonFiniteFactors
from attncache.pipeline.precompute.job import TooManySkipped
from attncache.pipeline.precompute.ray_runner import ClusterTooSmall, UnitsFailed
from attncache.pipeline.store.meta import StoreError
from attncache.pipeline.studies.pretrain import PretrainError
from attncache.pipeline.teacher.model import TeacherError
from attncache.pipeline.tools.plan import PlanError
from attncache.pipeline.train.checkpoint import TrainError
from attncache.pipeline.train.distributed import LaunchError
from attncache.pipeline.train.student import StudentMismatch
from attncache.storage_schema import SchemaError

# errors that are about the user's input, not bugs: one line naming file, key and cause, exit 1
USER_ERRORS = (BadSample, DataError, TooManySkipped, StoreError, SchemaError, TeacherError, UnitsFailed,
               ClusterTooSmall, StudentMismatch, PretrainError, TrainError,
               SpecError, PlanError, LaunchError,
               NonFiniteFactors)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
        except TypeError as exc:  # timm's create_model given a --model-arg/--student-arg key it does not take
            if "unexpected keyword argument" not in str(exc):
                raise
            raise click.ClickException(f"TypeError: {exc}: a --model-arg or --student-arg key the timm model does "
                                       "not take; see the model's constructor for its arguments") from exc
        except OSError as exc:  # a full disk, a read-only store, a path that is a file: the machine, not a bug
            if isinstance(exc, BrokenPipeError) or exc.errno is None:
                raise
            raise click.ClickException(os_error_line(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="attncache")
def cli() -> None:
    """attncache: precompute a teacher ViT's attention once, train students from the cache."""


for command in (data, teacher, precompute, verify, inspect, show, demo, repro, plan, bench, train, evaluate):
    cli.add_command(command)


if __name__ == "__main__":
    cli()
