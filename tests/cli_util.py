"""Running `clipkit` in-process in tests, and what every user error must look like: exit code 2,
exactly one `error:` line, no traceback, never torch's advice to turn the safe load off."""

from click.testing import CliRunner, Result

from clipkit.cli.main import cli


def invoke(*args) -> Result:
    """Run the CLI; whatever happens, no exception escapes it and no traceback is printed."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.stdout + result.stderr, result.output
    return result


def run(*args) -> tuple[int, str, str]:
    result = invoke(*args)
    return result.exit_code, result.stdout, result.stderr


def user_error(*args) -> str:
    """The one `error:` line of a command that must fail with exit code 2."""
    result = invoke(*args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, (args, result.exit_code, result.output)
    assert len(errors) == 1, result.stderr
    assert "weights_only" not in result.stderr, result.stderr
    return errors[0]
