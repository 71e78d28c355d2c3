"""A tiny conmon for the nodestep-oci tests, run as the test user.

    python oci_conmon.py REPORT_FD NODESTEP_OCI SOCKET BUNDLE PID_FILE ID [CONSOLE_SOCKET]

As conmon does: a child subreaper that runs `nodestep-oci create` with its own stdio,
then reads the pid file and waits for that pid as its child (the anchor, orphaned to us).
It reports on REPORT_FD, a line each: `created PID` (or `create-failed STATUS`), then
`exited CODE` or `signalled N`. With a console socket it listens there, takes the pty
master sent with SCM_RIGHTS and copies what it reads to its stdout.
"""

import array
import ctypes
import os
import socket
import subprocess
import sys
import threading

PR_SET_CHILD_SUBREAPER = 36


def main() -> None:
    fd, oci, sock_path, bundle, pid_file, cid = sys.argv[1:7]
    console = sys.argv[7] if len(sys.argv) > 7 else None
    report = os.fdopen(int(fd), "w", buffering=1)
    os.set_inheritable(int(fd), False)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    listener = None
    argv = [oci, "--socket", sock_path, "--log-format=json", "--log", pid_file + ".log", "create", "--bundle",
            bundle, "--pid-file", pid_file]
    if console:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(console)
        listener.listen(1)
        argv += ["--console-socket", console]
        threading.Thread(target=copy_console, args=(listener,), daemon=True).start()
    status = subprocess.run([*argv, cid], pass_fds=()).returncode
    if status != 0:
        report.write(f"create-failed {status}\n")
        return
    with open(pid_file) as f:
        text = f.read()
    assert text.isdigit(), repr(text)  # no trailing newline, as docker parses it
    pid = int(text)
    report.write(f"created {pid}\n")
    _, wait_status = os.waitpid(pid, 0)  # ECHILD here would mean the anchor is not ours
    if os.WIFSIGNALED(wait_status):
        report.write(f"signalled {os.WTERMSIG(wait_status)}\n")
    else:
        report.write(f"exited {os.WEXITSTATUS(wait_status)}\n")


def copy_console(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    fds = array.array("i")
    _, ancdata, _, _ = conn.recvmsg(1024, socket.CMSG_LEN(4))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:4])
    master = fds[0]
    os.write(1, b"console received\n")
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every slave end is closed
            break
        if not chunk:
            break
        os.write(1, chunk)


if __name__ == "__main__":
    main()
