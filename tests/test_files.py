"""Output files and folders: unwritable or busy folders refused before the work, failed writes as messages that keep the
earlier files."""

import collections
import errno
import fcntl
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from patchdb.errors import PatchdbError
from patchdb.files import LOCK_FILE, atomic_path, folder_lock, save_npy

from test_cli import sample, write_npz


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return f"file:{write_npz(tmp_path_factory.mktemp('data') / 'labelled.npz')}"


def command(name: str, spec: str, out) -> list[str]:
    """Small invocations of every command that writes an output folder (those of a network name a missing one:
    the folder is refused before the network is looked for)."""
    return {"sample": ["sample", "--dataset", spec, "--scales", "3", "--steps", "4", "--out", str(out)],
            "train": ["train", "--dataset", spec, "--epochs", "1", "--out", str(out)],
            "build-index": ["build-index", "--dataset", spec, "--scales", "3", "--out", str(out)],
            "calibrate": ["calibrate", "--model", str(out.parent / "no-run"), "--out", str(out / "scales.json")],
            "compare": ["compare", "--model", str(out.parent / "no-run"), "--out", str(out)]}[name]


COMMANDS = ("sample", "train", "build-index", "calibrate", "compare")


def modes_bind_this_process(folder) -> bool:
    """Whether a read-only folder refuses this process's files (not for root, whose capabilities override modes)."""
    probe = folder / "mode-probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "file").touch()
    except PermissionError:
        return True
    finally:
        (probe / "file").unlink(missing_ok=True)
        probe.rmdir()
    return False


@pytest.mark.parametrize("name", COMMANDS)
def test_a_read_only_output_folder_is_refused_before_any_work(spec, tmp_path, name):
    if not modes_bind_this_process(tmp_path):
        pytest.skip("this process writes into read-only folders (root): see the simulated test below")
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    result = CliRunner().invoke(main, command(name, spec, out))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: cannot write in the output folder {out} (Permission denied); choose another --out" in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unwritable_output_folder_is_refused_before_any_work(spec, tmp_path, monkeypatch, name):
    out = tmp_path / "out"
    real_open = os.open

    def refusing_open(path, *args, **kwargs):  # what a read-only folder, or one of another user, does
        if str(path).startswith(str(out)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    def no_work(*args, **kwargs):
        raise AssertionError("the work began before the output folder was checked")

    monkeypatch.setattr(os, "open", refusing_open)
    for work in ("patchdb.generate.generate", "patchdb.training._training_step", "patchdb.build.write_settings",
                 "patchdb.build._build_scale", "patchdb.training.load_network", "patchdb.comparison.resolve_model"):
        monkeypatch.setattr(work, no_work)
    result = CliRunner().invoke(main, command(name, spec, out))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: cannot write in the output folder {out} (Permission denied); choose another --out" in result.output
    assert not out.exists()  # the probe file is gone, and the empty folder made for the command with it


def test_a_full_disk_is_a_message_and_keeps_the_earlier_run(spec, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert sample(spec, out, "--num", "2").exit_code == 0
    earlier = np.load(out / "samples.npy")
    real_save = np.save

    def disk_fills(file, array, *args, **kwargs):
        file.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", disk_fills)
    result = sample(spec, out, "--num", "2", "--seed", "7")
    monkeypatch.setattr(np, "save", real_save)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert (f"Error: cannot write {out / 'samples.npy'} (No space left on device); free space on its disk or choose "
            "another --out") in result.output
    assert np.array_equal(np.load(out / "samples.npy"), earlier)  # the earlier file, whole
    assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]
    assert not (out / "run.json").exists()  # the folder says that its run was interrupted while writing


@pytest.mark.parametrize("failure", [OSError("65536 requested and 10208 written"),  # numpy's short write
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")])  # torch's
def test_a_write_that_fails_in_its_own_words_on_a_full_disk_says_so(tmp_path, monkeypatch, failure):
    path = tmp_path / "a.npy"
    save_npy(path, np.arange(3))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda folder: usage(100, 100, 0))
    with pytest.raises(PatchdbError, match=r"^cannot write .*a\.npy \(No space left on device\); free space on its disk"):
        with atomic_path(path) as temporary:
            temporary.write_bytes(b"partial")
            raise failure
    assert np.load(path).tolist() == [0, 1, 2] and [entry.name for entry in tmp_path.iterdir()] == ["a.npy"]


def test_errors_other_than_a_failed_write_pass_through(tmp_path):
    with pytest.raises(ValueError, match="not a write"):
        with atomic_path(tmp_path / "a.json"):
            raise ValueError("not a write")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", COMMANDS)
def test_a_folder_that_another_command_is_writing_to_is_refused_at_once(spec, tmp_path, monkeypatch, name):
    out = tmp_path / "busy"

    def no_work(*args, **kwargs):  # compare's training and calibration come after the lock, not before
        raise AssertionError("the work began before the output folder was locked")

    monkeypatch.setattr("patchdb.comparison.resolve_model", no_work)
    monkeypatch.setattr("patchdb.comparison.comparison_scales", no_work)
    # calibrate writes one file and locks that alone (train may be writing its run folder meanwhile)
    file = "scales.json" if name == "calibrate" else None
    with folder_lock(out, file):  # another command, as far as the lock can tell: flock locks each open of the file
        result = CliRunner().invoke(main, command(name, spec, out))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    target = out if file is None else out / file
    assert (f"Error: another patchdb command is writing to {target} (pid {os.getpid()}); wait for it or choose another "
            "--out" in result.output)
    assert not list(out.iterdir())  # nothing written, and the lock gone with its holder


def test_the_lock_is_released_at_the_end_even_of_a_failed_command_and_a_stale_lock_file_is_taken(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError), folder_lock(tmp_path / "out") as out:
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        raise ValueError("the command failed")
    assert not (out / LOCK_FILE).exists() and out.is_dir()  # a folder that was there stays, empty or not
    (out / LOCK_FILE).write_text("12345\n")  # left by a killed command, which held no lock any more
    with folder_lock(out):
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not list(out.iterdir())


@pytest.fixture
def foreign_lock_file(monkeypatch):
    """Lock files that this user may read but not write, as another user's are (the tests run as any user, root too)."""
    real_open = os.open

    def open_as_another_user(path, flags, *mode):
        if os.path.basename(path) == LOCK_FILE and os.path.exists(path) and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *mode)

    monkeypatch.setattr(os, "open", open_as_another_user)


def test_a_lock_file_that_another_users_killed_command_left_is_taken_unless_it_is_held(tmp_path, foreign_lock_file,
                                                                                        monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("12345\n")  # unlocked: its command was killed
    with folder_lock(out):
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # a new file, this user's
        with pytest.raises(PatchdbError, match=f"writing to {out} \\(pid {os.getpid()}\\); wait for it or choose"):
            with folder_lock(out):  # the new one, held: its holder is named
                pass
    assert not list(out.iterdir())
    (out / LOCK_FILE).write_text("12345\n")
    real_unlink = os.unlink

    def keep_other_users_files(path, *args, **kwargs):  # a folder whose sticky bit keeps other users' files
        if os.path.basename(path) == LOCK_FILE:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", keep_other_users_files)
    with pytest.raises(PatchdbError, match=f"cannot lock {out} \\(Permission denied: .*\\); remove .*{LOCK_FILE} if no "
                                           "command is writing there, or choose another --out"):
        with folder_lock(out):
            pass


def test_an_error_raised_while_handling_a_failed_write_says_why(tmp_path):
    """torch.save through a Python file: its RuntimeError keeps the file's OSError (here a quota, which leaves the disk
    with free space) as its context."""
    with pytest.raises(PatchdbError, match=r"checkpoint\.pt \(Disk quota exceeded\); free space on its disk"):
        with atomic_path(tmp_path / "checkpoint.pt"):
            try:
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert not list(tmp_path.iterdir())


def test_a_bug_raised_while_handling_an_os_error_is_not_a_failed_write(tmp_path):
    # the KeyError suppressed its context (from None): it is the code's error, not the disk's
    with pytest.raises(KeyError, match="missing"):
        with atomic_path(tmp_path / "record.json"):
            try:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            except FileNotFoundError:
                raise KeyError("missing") from None
    assert not list(tmp_path.iterdir())


def test_one_file_of_a_locked_folder_has_its_own_lock_and_a_lockless_file_system_is_a_message(tmp_path, monkeypatch):
    with folder_lock(tmp_path / "run"):  # train holds its run folder; calibrate may still write its schedule there
        with folder_lock(tmp_path / "run", "scales.json"):
            assert (tmp_path / "run" / ".scales.json.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(PatchdbError, match="writing to .*run \\(pid"):
            with folder_lock(tmp_path / "run"):
                pass

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(PatchdbError, match="cannot lock .*elsewhere \\(No locks available\\); choose another --out"):
        with folder_lock(tmp_path / "elsewhere"):
            pass
    assert not (tmp_path / "elsewhere").exists()  # no lock file left behind, nor the folder made for it


def test_a_failed_command_removes_the_folders_it_created_while_they_are_empty(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(PatchdbError, match="no such run"), folder_lock(kept / "new" / "out"):
        raise PatchdbError("no such run")  # a command refused after its folder was made: a mistyped --model
    assert list(tmp_path.iterdir()) == [kept] and not list(kept.iterdir())
    with pytest.raises(KeyboardInterrupt), folder_lock(kept / "new" / "run") as run:
        (run / "checkpoint.pt").write_bytes(b"weights")
        raise KeyboardInterrupt  # what was written stays, and so do the folders above it
    assert [path.name for path in run.iterdir()] == ["checkpoint.pt"]
    with folder_lock(kept / "empty"):  # a command that succeeds keeps its folder even where it wrote nothing
        pass
    assert (kept / "empty").is_dir()


def test_compare_with_a_mistyped_model_leaves_no_output_folder(tmp_path):
    result = CliRunner().invoke(main, ["compare", "--model", str(tmp_path / "runs" / "resnt"), "--out",
                                       str(tmp_path / "comparisons" / "out")])
    assert result.exit_code == 1 and "is not a trained run" in result.output, result.output
    assert not list(tmp_path.iterdir())


def test_a_folder_where_a_file_goes_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "a.json").mkdir()
    with pytest.raises(PatchdbError, match=rf"^{tmp_path / 'a.json'} is a folder, where this command writes its file "
                                           r"a.json; choose another --out, or move that folder away$"):
        with atomic_path(tmp_path / "a.json") as temporary:
            pytest.fail(f"{temporary} was offered for writing")
    with pytest.raises(PatchdbError, match=r"a.json is a folder, where this command writes its file a.json; choose "
                                           r"another --store"):
        with folder_lock(tmp_path, option="--store", outputs=("b.json", "a.json")):
            pytest.fail("the folder was locked for writing")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.json"]  # nor the lock file left
    (tmp_path / "link.json").symlink_to(tmp_path / "a.json")  # a link to a folder is replaced itself
    with folder_lock(tmp_path, outputs=("link.json",)):
        save_npy(tmp_path / "link.json", np.arange(2))
    assert (tmp_path / "link.json").is_file() and not (tmp_path / "link.json").is_symlink()
