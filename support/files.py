"""
Writes that a crash cannot leave half done, without torch: a file or a directory is written
under a temporary name beside its place and renamed into it once complete (a rename is atomic),
so a kill at any moment leaves the old version or the new one. Token shards, checkpoints, logs,
manifests and exports are all written so, and the temporaries a killed writer leaves behind are
removed by one rule: never those of a process that is still alive.
"""

import contextlib
import json
import os
import re
import shutil

# the temporary name of a file or directory being written: .{name}.{pid}.tmp beside it
TEMPORARY_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def temporary_path(path, pid=None):
    """Where `path` is written until it is complete, by the process `pid` (by default this one)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{pid or os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a file for writing that appears under `path` only once it is complete: written under
    its temporary name, flushed to disk, then renamed."""
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj, indent=2):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent)


@contextlib.contextmanager
def atomic_directory(path, pid=None, owner=True):
    """A temporary directory to fill (yielded) that becomes `path` once complete. Writers in
    several processes may share it: they name it by the owner's pid, and only the owner renames
    it, or removes it when the writing failed."""
    tmp = temporary_path(path, pid)
    try:
        yield tmp
        if owner:
            replace_directory(tmp, path)
    finally:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(tmp, path):
    """Rename the complete directory tmp to path: atomically where path is new; an earlier path
    (a step saved again, an empty export directory) is moved aside first and removed after."""
    if os.path.exists(path):
        old = f"{tmp}.old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)


def atomic_remove(path):
    """Remove a file or directory: renamed out of its listing first (atomically), then deleted;
    a kill in between leaves a temporary that remove_stale_temporaries clears."""
    tmp = temporary_path(path)
    os.replace(path, tmp)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    else:
        os.remove(tmp)


def remove_stale_temporaries(directory, names):
    """Delete the temporary files and directories of the given names (a regular expression of
    the final names) that killed processes left in directory: a SIGKILL during a save leaves one
    as large as a checkpoint. Those of a live process are its writes in progress: left alone."""
    for entry in os.listdir(directory):
        m = TEMPORARY_FILE.match(entry)
        if m and re.fullmatch(names, m["name"]) and not process_alive(int(m["pid"])):
            path = os.path.join(directory, entry)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
