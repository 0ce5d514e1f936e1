"""This process's host: whether a process that left files behind is still
running, and how much memory is available.

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


def available_memory():
    """Bytes of memory the system has available now (Linux, macOS), or
    None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
