"""Entry point of the `attncache` console script."""
import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="attncache")
def cli() -> None:
    """attncache: precompute a teacher ViT's attention once, train students from the cache."""


if __name__ == "__main__":
    cli()
