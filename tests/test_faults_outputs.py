"""Issue 14, outputs and checkpoints: corrupt or hostile weight files are refused in one line,
outputs never overwrite inputs or folders clipkit did not write, unwritable outputs fail in one
line before the work, and created files follow the umask."""

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from cli_util import run, user_error

from clipkit import checkpoint

SMALL_DEMO = [
    "--train-samples", 20, "--eval-samples", 10, "--probe-train-samples", 10,
    "--image-size", 16, "--shard-size", 10,
]  # fmt: skip


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture
def run_copy(tiny_checkpoint, tmp_path):
    """A private copy of the tiny trained run (tests may damage it)."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "run"))


def flip_tensor_bytes(path: Path) -> None:
    """Overwrite bytes in the middle of the largest tensor's data inside the zip (CRC no longer
    matches); the archive structure stays valid, so torch itself loads it without a word."""
    with zipfile.ZipFile(path) as archive:
        member = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[member.header_offset + 26 : member.header_offset + 30]
    )
    start = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
    raw[start : start + 8] = bytes(b ^ 0xFF for b in raw[start : start + 8])
    path.unlink()  # latest.pt is a hard link: damage this name only
    path.write_bytes(bytes(raw))


# ---- checkpoints: CRC, checksum, text files, pickles ----


@pytest.mark.parametrize("command", ["zero-shot", "export", "resume"])
def test_crc_corruption_is_refused_by_every_loader(command, run_copy, demo_root, tmp_path):
    latest = run_copy / "checkpoints" / "latest.pt"
    flip_tensor_bytes(latest)
    torch.load(latest, weights_only=True)  # what the issue saw: torch alone does not notice
    args = {
        "zero-shot": ["zero-shot", "demo", "--data-root", demo_root, "--checkpoint", run_copy],
        "export": ["export", "--checkpoint", run_copy, "--out", tmp_path / "exported"],
        "resume": ["pretrain", "--out", run_copy, "--resume", "--steps", 14, "--threads", 1],
    }[command]
    line = user_error(*args, *(["--workers", 0] if command == "zero-shot" else []))
    assert "CRC" in line and "latest.pt" in line
    assert not (tmp_path / "exported").exists()


def test_tensor_checksum_is_stored_and_verified(run_copy, demo_root, tmp_path):
    latest = run_copy / "checkpoints" / "latest.pt"
    state = torch.load(latest, weights_only=True)
    assert state[checkpoint.CHECKSUM_KEY] == checkpoint.tensor_sha256(state)
    # A valid archive whose tensors changed after the checksum was taken (CRCs rewritten).
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name] + 1e-3
    torch.save(state, tmp_path / "edited.pt")
    line = user_error(
        "zero-shot", "demo", "--data-root", demo_root, "--checkpoint", tmp_path / "edited.pt"
    )
    assert "checksum" in line
    # Checkpoints written before the checksum existed still load.
    del state[checkpoint.CHECKSUM_KEY]
    torch.save(state, tmp_path / "old.pt")
    assert checkpoint.load(tmp_path / "old.pt")["step"] == state["step"]


class Evil:
    """Unpickling it would create the file named by $CLIPKIT_TEST_PWNED."""

    def __reduce__(self):
        return (open, (os.environ["CLIPKIT_TEST_PWNED"], "w"))


@pytest.fixture
def pwned(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CLIPKIT_TEST_PWNED", str(marker))
    yield marker
    assert not marker.exists()  # the pickled code never ran


def _exported_local_dir(ckpt, tmp_path) -> Path:
    folder = tmp_path / "local"
    assert run("export", "--checkpoint", ckpt, "--out", folder)[0] == 0
    return folder


@pytest.mark.parametrize(
    "case", ["text-checkpoint", "pickle-checkpoint", "text-pretrained", "text-pretrained-msclip",
             "pickle-pretrained",
             "pickle-local-dir", "text-safetensors"],
)  # fmt: skip
def test_text_files_and_pickles_are_refused_in_one_line(
    case, tiny_checkpoint, demo_root, tmp_path, pwned
):
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not weights\n")
    evil = tmp_path / "evil.bin"
    torch.save({"config": {}, "format_version": 1, "x": Evil()}, evil)
    zs = ["zero-shot", "demo", "--data-root", demo_root, "--workers", 0]
    if case == "text-checkpoint":
        assert "not a clipkit checkpoint" in user_error(*zs, "--checkpoint", text)
    elif case == "pickle-checkpoint":
        assert "pickled objects" in user_error(*zs, "--checkpoint", evil)
    elif case == "text-pretrained":
        assert "not a readable weights file" in user_error(
            *zs, "--model", "test", "--pretrained", text
        )
    elif case == "text-pretrained-msclip":  # MS-CLIP reads weight files with its own loader
        assert "not a readable weights file" in user_error(
            *zs, "--model", "msclip-tiny", "--pretrained", text
        )
    elif case == "pickle-pretrained":
        assert "pickled objects" in user_error(*zs, "--model", "test", "--pretrained", evil)
    else:
        folder = _exported_local_dir(tiny_checkpoint, tmp_path)
        (folder / "open_clip_model.safetensors").unlink()
        if case == "pickle-local-dir":
            shutil.copy(evil, folder / "open_clip_pytorch_model.bin")
            expected = "pickled objects"
        else:
            (folder / "open_clip_model.safetensors").write_text("not safetensors")
            expected = "not a readable safetensors file"
        assert expected in user_error(*zs, "--model", f"local-dir:{folder}")


# ---- --out never overwrites an input; --overwrite replaces only clipkit's own outputs ----


def _index_args(ckpt, demo_root, out):
    return ["retrieve", "index", "--checkpoint", ckpt, "--data", demo_root / "eval",
            "--out", out, "--workers", 0]  # fmt: skip


@pytest.mark.parametrize("command", ["export", "index"])
@pytest.mark.parametrize("where", ["run", "inside-run", "contains-run", "checkpoint-symlink"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_contains_or_lies_inside_an_input_is_refused(
    command, where, overwrite, run_copy, demo_root, tmp_path
):
    before = tree_digest(run_copy)
    ckpt = run_copy
    if where == "checkpoint-symlink":  # the same run reached through a link
        (tmp_path / "link").symlink_to(run_copy)
        ckpt = tmp_path / "link" / "checkpoints" / "latest.pt"
    out = {
        "run": run_copy,
        "inside-run": run_copy / "checkpoints",
        "contains-run": tmp_path,
        "checkpoint-symlink": run_copy,
    }[where]
    if command == "export":
        args = ["export", "--checkpoint", ckpt, "--out", out]
    else:
        args = _index_args(ckpt, demo_root, out)
    line = user_error(*args, *(["--overwrite"] if overwrite else []))
    assert "input" in line
    assert tree_digest(run_copy) == before
    assert not [n for n in hidden(tmp_path) + hidden(run_copy) if ".tmp-" in n]


def test_index_out_over_its_data_is_refused(tiny_checkpoint, demo_root, tmp_path):
    data = Path(shutil.copytree(demo_root / "eval", tmp_path / "eval"))
    before = tree_digest(data)
    for out in (data, data / "sub", tmp_path):
        args = ["retrieve", "index", "--checkpoint", tiny_checkpoint, "--data", data]
        assert "input" in user_error(*args, "--out", out, "--overwrite")
    assert tree_digest(data) == before


def test_overwrite_replaces_only_an_earlier_output_of_the_same_kind(tiny_checkpoint, tmp_path):
    export = ["export", "--checkpoint", tiny_checkpoint, "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert "did not write" in user_error(*export, mine, "--overwrite")
    index_dir = tmp_path / "idx"
    index_dir.mkdir()
    (index_dir / ".clipkit-output").write_text(json.dumps({"kind": "index"}))
    (index_dir / "image.index").write_bytes(b"x")
    assert "'index' output" in user_error(*export, index_dir, "--overwrite")
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert (index_dir / "image.index").read_bytes() == b"x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(*export, empty)[0] == 0  # an empty folder is as good as a new one
    assert "already exists" in user_error(*export, empty)
    assert run(*export, empty, "--overwrite")[0] == 0
    assert json.loads((empty / ".clipkit-output").read_text())["kind"] == "export"
    assert not [n for n in hidden(tmp_path) if ".tmp-" in n or ".old-" in n]


def test_demo_refuses_user_shards_and_replaces_an_earlier_demo(tmp_path):
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "000.tar").write_bytes(b"my own shard")
    assert "did not write" in user_error("data", "demo", "--out", mine, *SMALL_DEMO)
    assert (mine / "train" / "000.tar").read_bytes() == b"my own shard"
    assert sorted(p.name for p in (mine / "train").iterdir()) == ["000.tar"]
    demo = tmp_path / "demo"
    assert run("data", "demo", "--out", demo, *SMALL_DEMO)[0] == 0
    assert run("data", "demo", "--out", demo, *SMALL_DEMO, "--seed", 1)[0] == 0
    assert json.loads((demo / "demo.json").read_text())["seed"] == 1
    assert not [p for p in demo.rglob("*") if ".tmp" in p.name]


# ---- unwritable outputs: one line before the work; full disk: one line, nothing left ----


def _commands(ckpt, demo_root, tmp_path, out):
    zs = ["zero-shot", "demo", "--data-root", demo_root, "--checkpoint", ckpt, "--workers", 0]
    probe = ["probe", "demo", "--data-root", demo_root, "--checkpoint", ckpt, "--workers", 0]
    return {
        "export": ["export", "--checkpoint", ckpt, "--out", out],
        "zero-shot -o": [*zs, "-o", out],
        "probe -o": [*probe, "--no-cache", "-o", out],
        "retrieve index": _index_args(ckpt, demo_root, out),
        "retrieve eval -o": ["retrieve", "eval", "--checkpoint", ckpt, "--data",
                             demo_root / "eval", "--workers", 0, "-o", out],
        "search --html": ["retrieve", "search", "--index", tmp_path / "idx", "--text", "a star",
                          "--html", out],
        "data demo": ["data", "demo", "--out", out, *SMALL_DEMO],
        "inspect masks": ["inspect", "masks", "--checkpoint", ckpt, "--data", demo_root / "eval",
                          "--out", out],
    }  # fmt: skip


COMMANDS = list(_commands("c", Path("d"), Path("t"), "o"))


@pytest.fixture(scope="module")
def index_dir(tiny_checkpoint, demo_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index") / "idx"
    assert run(*_index_args(tiny_checkpoint, demo_root, folder))[0] == 0
    return folder


def _with_index(tmp_path, index_dir):
    shutil.copytree(index_dir, tmp_path / "idx")


@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_fails_in_one_line_before_the_work(
    command, tiny_checkpoint, demo_root, index_dir, tmp_path, monkeypatch
):
    _with_index(tmp_path, index_dir)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    out = blocker / "sub" / "out"
    # Tests run as root (permissions ignored): a file in the path is what cannot be written.
    # The model is never loaded: the check comes first.
    monkeypatch.setattr("clipkit.checkpoint.read", lambda *a, **k: pytest.fail("loaded first"))
    line = user_error(*_commands(tiny_checkpoint, demo_root, tmp_path, out)[command])
    assert "cannot write" in line and "not a directory" in line and str(blocker) in line
    assert blocker.read_text() == "a file where a folder should be"


@pytest.mark.parametrize("command", ["export", "retrieve index", "data demo"])
def test_out_that_is_a_file_is_refused(command, tiny_checkpoint, demo_root, tmp_path):
    out = tmp_path / "file"
    out.write_text("keep me")
    args = _commands(tiny_checkpoint, demo_root, tmp_path, out)[command]
    assert "is a file" in user_error(*args, *(["--overwrite"] if command != "data demo" else []))
    assert out.read_text() == "keep me"


def test_inspect_out_that_is_a_folder_is_refused(tiny_checkpoint, demo_root, tmp_path):
    args = _commands(tiny_checkpoint, demo_root, tmp_path, tmp_path)["inspect masks"]
    assert "is a folder" in user_error(*args)


def test_results_never_overwrite_the_checkpoint(run_copy, demo_root):
    before = tree_digest(run_copy)
    for out in (run_copy / "checkpoints").iterdir():  # latest.pt and the step files
        args = _commands(run_copy, demo_root, run_copy, out)["zero-shot -o"]
        assert "is the input" in user_error(*args)
    assert tree_digest(run_copy) == before


ENOSPC_TARGETS = {  # where the write fails, per command
    "export": "clipkit.export._write_weights",
    "zero-shot -o": "clipkit.fileio.os.fsync",
    "retrieve index": "clipkit.index.save_index",
    "search --html": "clipkit.fileio.os.fsync",
    "data demo": "clipkit.data.demo._write_splits",
}


@pytest.mark.parametrize("command", list(ENOSPC_TARGETS))
def test_full_disk_is_one_line_and_leaves_nothing(
    command, tiny_checkpoint, demo_root, index_dir, tmp_path, monkeypatch
):
    _with_index(tmp_path, index_dir)
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    out = out_dir / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ENOSPC_TARGETS[command], full)
    line = user_error(*_commands(tiny_checkpoint, demo_root, tmp_path, out)[command])
    assert "cannot write" in line and "No space left on device" in line and str(out) in line
    leftovers = list(out_dir.rglob("*"))
    assert leftovers in ([], [out]) and not (out.is_dir() and any(out.iterdir())), leftovers


def test_data_check_warns_when_sizes_json_cannot_be_written(demo_root, tmp_path):
    shards = Path(shutil.copytree(demo_root / "eval", tmp_path / "eval"))
    (shards / "sizes.json").unlink()
    (shards / "sizes.json").mkdir()  # unwritable as a file, even for root
    result = subprocess.run(
        [sys.executable, "-m", "clipkit", "data", "check", str(shards)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "64 good samples" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "sizes.json" in line]
    assert len(warnings) == 1 and "cannot write" in warnings[0], result.stderr


# ---- permissions follow the umask ----


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_created_folders_and_files_follow_the_umask(umask, tiny_checkpoint, demo_root, tmp_path):
    old = os.umask(umask)
    try:
        assert run("export", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "exp")[0] == 0
        assert run(*_index_args(tiny_checkpoint, demo_root, tmp_path / "idx"))[0] == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "exp", tmp_path / "idx"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder
        for f in folder.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
