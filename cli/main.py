"""Entry point of the `attncache` console script."""
import click

from cli.cache_cmd import inspect, precompute, show, verify
from cli.data_cmd import data
from cli.demo_cmd import demo


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="attncache")
def cli() -> None:
    """attncache: precompute a teacher ViT's attention once, train students from the cache."""


for command in (data, precompute, verify, inspect, show, demo):
    cli.add_command(command)


if __name__ == "__main__":
    cli()
