"""User mistakes in the data and models commands: one line, exit 2, no traceback, nothing written.
(pretrain: tests/test_cli_pretrain.py; evaluation: tests/test_cli_eval.py, tests/test_export.py;
inspect: tests/test_aclip_train.py.)"""

import pytest
from click.testing import CliRunner

from clipkit.cli.main import cli


def _user_error(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 2, (args, res.exit_code, res.output)
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in res.output
    return err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["data", "demo", "--out", "{tmp}/d", "--train-samples", 0], "train_samples"),
        (["data", "demo", "--out", "{tmp}/d", "--image-size", 4], "image_size"),
        (["data", "demo", "--out", "{tmp}/d", "--seed", "abc"], "Invalid value"),
        (["data", "demo"], "Missing option '--out'"),
        (["data", "check", "{tmp}/none"], "no shard matches"),
        (["data", "check", "{tmp}/none-{{00..02}}.tar"], "no shard matches"),
        (["data", "nope"], "No such command"),
        (["models", "not-a-model"], "unknown model"),
        (["models", "{tmp}/missing.json"], "model config file not found"),
        (["nope"], "No such command"),
    ],
)
def test_data_and_models_errors(tmp_path, args, needle):
    args = [str(a).format(tmp=tmp_path) for a in args]
    assert needle in _user_error(*args)
    assert not (tmp_path / "d").exists()
