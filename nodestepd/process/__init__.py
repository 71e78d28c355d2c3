"""Processes and the kernel: the one part of nodestepd that touches the kernel directly.

The rule: only the modules of this package may import ctypes or fcntl, call
os.pidfd_open, signal.pidfd_send_signal or prctl, or read SO_PEERCRED. Everything else
asks them. Raw kernel calls are where a root daemon goes wrong quietly (a signal to a
recycled pid, a status stolen by the wrong waitpid, an fd leaked into a user's process),
so they are kept where their rules are written down once, next to the code that keeps
them. The child side of asuser.py uses plain os calls in its own, unprivileged process.

- kernel.py: the daemon's own settings and sockets: prctl (no_new_privs, child
  subreaper), a connection's peer credentials (SO_PEERCRED), the fd limit, sealed memfds.
- watch.py: one process through its pidfd (Pidfd), watched to its end on the event loop
  or blocking (ProcessWatch), and ExitWatch, what a step needs of any such watch.
- spawn.py: `spawn`, the one way a process is started, and what is built on it (a
  runtime's shell command, a short helper command whose output we collect).
- monitor.py (and monitor.c, the program): a task's parent outside the daemon,
  nodestepd-monitor, and the daemon's side of it; exitfile.py: the exit files the
  monitors write, read back after a restart.
- reaper.py: what gets orphaned to the daemon, reaped.
- asuser.py: files opened with a user's rights by a helper process running as that user.
- identity.py: who a process runs as.
"""
