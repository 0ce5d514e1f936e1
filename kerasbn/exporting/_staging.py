"""Stage artifacts beside the output directory, then move them into place.

An export writes everything into a staging directory next to the output
directory, on the same filesystem, named after it and after the exporting
process:

    <parent>/.<dirname>.kerasbn-staging-<pid>-<random>/new/<artifact paths>

and only after verification moves each artifact into `<parent>/<dirname>`
with `os.replace` (atomic per artifact; a failed move rolls back the ones
made). A run killed outright (SIGKILL, power loss) thus leaves nothing
inside the output directory that a later run, a copy or a model server
would pick up; the next export to the same directory removes staging
directories whose process is gone. When the output directory exists but
its parent is read-only or on another filesystem (a mount point), staging
happens inside the output directory instead, under the same hidden name,
and is cleaned up the same way.

Only the standard library is used: this module loads without TensorFlow.
"""

import contextlib
import os
import re
import shutil
import tempfile

from kerasbn._processes import pid_alive
from kerasbn.exporting._result import ExportError

_MARK = ".kerasbn-staging-"


def remove_stale(directory):
    """Remove staging directories of `directory` left by dead processes.

    Looks beside `directory` and inside it; returns the paths removed. A
    staging directory whose process still runs (or that belongs to
    another user's live process) is left alone.
    """
    base = os.path.basename(directory) or "output"
    pattern = re.compile(r"^\." + re.escape(base) + re.escape(_MARK)
                         + r"(\d+)-")
    removed = []
    for place in (os.path.dirname(directory), directory):
        try:
            names = os.listdir(place)
        except OSError:
            continue
        for entry in names:
            match = pattern.match(entry)
            if match and not pid_alive(int(match.group(1))):
                path = os.path.join(place, entry)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _make_directories(path, directory):
    """`os.makedirs(path)` for an export to `directory`.

    Returns the directories it created, outermost first.
    """
    missing = []
    probe = path
    while probe and not os.path.lexists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ExportError(
            f"Cannot create output directory {directory!r}: "
            f"{error.strerror or error}. Choose a writable location."
        ) from error
    return missing[::-1]


def _writable(path):
    return os.access(path, os.W_OK | os.X_OK)


def check_output_directory(directory):
    """Raise `ExportError` if `directory` cannot be created or written.

    Only looks (creates nothing): the CLI calls it before TensorFlow loads.
    """
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ExportError(
            f"Output path {directory!r} exists and is not a directory. "
            "Choose a directory."
        )
    existing = directory
    while (not os.path.lexists(existing)
           and os.path.dirname(existing) != existing):
        existing = os.path.dirname(existing)
    cannot = f"Cannot create output directory {directory!r}: {existing!r} is"
    if not os.path.isdir(existing):
        raise ExportError(f"{cannot} not a directory. Choose a writable "
                          "location.")
    if not _writable(existing):
        raise ExportError(
            (f"Output directory {directory!r} is" if existing == directory
             else cannot)
            + " not writable. Choose a writable location or fix its "
            "permissions."
        )


def _staging_place(directory):
    """Where to stage: beside `directory` if possible, else inside it."""
    parent = os.path.dirname(directory)
    if os.path.isdir(directory) and (
            not _writable(parent)
            or os.stat(parent).st_dev != os.stat(directory).st_dev):
        return directory
    return parent


class StagingArea:
    """A context manager: a staging directory for one export to `directory`.

    On exit the staging directory is removed; on an exception the
    directories this export created (the output directory, its missing
    parents, the artifacts' folders) are removed too when empty.

    Attributes:
        path: The staging directory (set on entry).
    """

    def __init__(self, directory):
        self.directory = directory
        self.path = None
        self._created = []

    def __enter__(self):
        directory = self.directory
        check_output_directory(directory)
        self._created = _make_directories(os.path.dirname(directory),
                                          directory)
        try:
            remove_stale(directory)
            base = os.path.basename(directory) or "output"
            self.path = tempfile.mkdtemp(
                prefix=f".{base}{_MARK}{os.getpid()}-",
                dir=_staging_place(directory))
        except OSError as error:
            # Permission bits said yes, the file system says no (root on a
            # read-only mount, /proc, /sys).
            self._remove_created()
            raise ExportError(
                f"Cannot write in output directory {directory!r}: "
                f"{error.strerror or error}. Choose a writable location."
            ) from None
        except BaseException:
            self._remove_created()
            raise
        return self

    def new(self, relpath):
        """Staging path for the artifact at `relpath`; its folder is made."""
        path = os.path.join(self.path, "new", relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def commit(self, relpaths, overwrite, replace=()):
        """Move the staged artifacts into place; roll back if a move fails.

        `replace`: relpaths that may replace an existing file without
        `overwrite` (a companion file this export updates).
        """
        moved, backups = [], []
        try:
            for rel in relpaths:
                final = os.path.join(self.directory, rel)
                self._created += _make_directories(os.path.dirname(final),
                                                   self.directory)
                if os.path.lexists(final):
                    backups.append((self._set_aside(
                        final, rel, overwrite or rel in replace), final))
                os.replace(os.path.join(self.path, "new", rel), final)
                moved.append(final)
        except BaseException:
            _roll_back(moved, backups)
            raise

    def _set_aside(self, final, rel, overwrite):
        if not overwrite:
            raise ExportError(f"{final} appeared during the export; not "
                              "replaced.")
        backup = os.path.join(self.path, "old", rel)
        os.makedirs(os.path.dirname(backup), exist_ok=True)
        os.replace(final, backup)
        return backup

    def _remove_created(self):
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def __exit__(self, exc_type, exc, traceback):
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if exc_type is not None:
            self._remove_created()
        return False


def _roll_back(moved, backups):
    for final in moved:
        if os.path.isdir(final) and not os.path.islink(final):
            shutil.rmtree(final, ignore_errors=True)
        elif os.path.lexists(final):
            os.remove(final)
    for backup, final in backups:
        os.replace(backup, final)
