from click.testing import CliRunner

from cli.main import cli


def test_top_level_help_lists_the_tool():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    assert "attncache" in result.output
