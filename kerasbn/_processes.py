"""Whether a process that left files behind is still running.

Export staging directories and recalibration spill directories carry the
pid of the process that made them; a directory whose process is gone was
left by a run killed outright and may be removed.
"""

import os


def pid_alive(pid):
    """Whether process `pid` may still run on this host (unsure: yes)."""
    if pid == os.getpid() or os.name == "nt":
        # On Windows os.kill(pid, 0) sends CTRL_C_EVENT: never probe there.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # PermissionError: it exists, under another user.
    return True
