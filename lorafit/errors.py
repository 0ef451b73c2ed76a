"""The one exception type the CLI turns into a one-line message, and the one mapping of OS failures onto it."""

from __future__ import annotations

import errno


class LorafitError(Exception):
    """Bad input (exit 2) or a runtime failure (exit 1), with a message that says how to fix it."""

    def __init__(self, message: str, *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# errno -> (the cause in a user's words, what to do, exit code: 2 the user can fix it, 1 the machine failed)
CAUSES = {
    errno.ENOSPC: ("the disk is full", "free some space", 1),
    errno.EDQUOT: ("the disk quota is used up", "free some space", 1),
    errno.EFBIG: ("the file would pass the file-size limit", "raise the limit (ulimit -f)", 1),
    errno.EIO: ("the device reported an input/output error", "check the disk", 1),
    errno.ENOMEM: ("the machine is out of memory", "free some memory", 1),
    errno.EISDIR: ("it is a folder where a file is expected", "remove or rename it", 2),
    errno.ENOTDIR: ("a part of the path is a file where a folder is expected", "fix the path", 2),
    errno.ENAMETOOLONG: ("a name is longer than the file system allows (255 bytes)", "choose a shorter name", 2),
    errno.EACCES: ("permission denied", "choose a place you can write to, or fix the permissions", 2),
    errno.EPERM: ("the operation is not permitted", "choose a place you can write to, or fix the permissions", 2),
    errno.EROFS: ("the file system is read-only", "choose a writable place", 2),
    errno.ENOENT: ("it does not exist", "fix the path", 2),
    errno.ELOOP: ("it is a loop of symbolic links", "fix the link", 2),
    errno.EEXIST: ("it already exists", "remove it or choose another name", 2),
    errno.ENOTEMPTY: ("the folder is not empty", "remove it or choose another name", 2),
}


def os_failure(error: OSError, kept: str = "") -> LorafitError:
    """One line for an OS failure: the path, the cause in plain words, what was kept, and what to do.

    `kept` says what the failed command saved before it failed ("the newest checkpoint is ...").
    """
    cause, fix, code = CAUSES.get(error.errno, (error.strerror or str(error), "fix the cause and run again", 1))
    where = f"{error.filename}: " if error.filename else ""
    return LorafitError("; ".join(part for part in (f"{where}{cause}", kept, fix) if part), exit_code=code)
