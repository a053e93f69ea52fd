"""`python -m clipkit ...` (what `torchrun -m clipkit pretrain ...` runs)."""

from clipkit.cli.main import cli

if __name__ == "__main__":
    cli(prog_name="clipkit")
