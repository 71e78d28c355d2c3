/* Test tool for docs/security.md, "A process stopped before its exec" (issue 19.2): stop
   new processes before they exec.

   stopper                  Run as a user: sends SIGSTOP to each of the next pids after
                            /proc/sys/kernel/ns_last_pid until it is delivered. The kernel
                            lets it stop only that user's own processes (EPERM while a pid
                            is still root's, so a child of the daemon is stopped the moment
                            it has switched to the user): the attack of the issue. Whether
                            it lands before the exec is a race of a few microseconds.
   stopper PID DEPTH        Run as root: traces PID (all its threads) and stops, right
                            after its fork, every new process DEPTH forks below it (1: its
                            children; 2: its children's children), then lets go of it: it
                            stays stopped (state T) before its exec, as if its user had won
                            that race, every time. Nothing but PID's descendants is touched:
                            PID runs on (its signals passed on), and a process between PID
                            and DEPTH (a task's monitor) is let go after its first fork.
   stopper PID DEPTH exec   The same, but each such process is stopped right after its first
                            exec instead: where a child of the daemon that runs as root until
                            its exec (spawn.py's vfork of nodestepd-monitor --exec-as, which
                            switches to the user only then) is first the user's, and its
                            user can stop it before it execs the user's program.

   Prints "ready" once watching, then each pid it stopped, one a line; runs until killed
   (tracees are let go by the kernel then). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <stdbool.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#define WINDOW 8
#define PIDS 4194304

static unsigned char done[PIDS]; /* stopped already (user mode) */

static long last_pid(int fd)
{
	char buf[32];
	ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	return strtol(buf, NULL, 10);
}

static void stopped(long pid)
{
	printf("%ld\n", pid);
	fflush(stdout);
}

/* ---- root mode: ptrace ------------------------------------------------------------- */

#define MAX_TRACEES 65536
static struct {
	pid_t pid;
	int depth;   /* 0: a thread of PID; n: a process n forks below it */
	bool known;  /* its parent's fork event came: depth is right */
	bool waiting; /* its first stop came before that event */
	bool at_exec; /* exec mode: to be stopped at its exec */
} tracees[MAX_TRACEES];

static int find(pid_t pid, bool add)
{
	int free_slot = -1;
	for (int i = 0; i < MAX_TRACEES; i++) {
		if (tracees[i].pid == pid)
			return i;
		if (free_slot < 0 && tracees[i].pid == 0)
			free_slot = i;
	}
	if (!add || free_slot < 0)
		return -1;
	tracees[free_slot].pid = pid;
	tracees[free_slot].depth = 0;
	tracees[free_slot].known = false;
	tracees[free_slot].waiting = false;
	tracees[free_slot].at_exec = false;
	return free_slot;
}

static void forget(pid_t pid)
{
	int i = find(pid, false);
	if (i >= 0)
		tracees[i].pid = 0;
}

static int target_depth;
static bool at_exec_mode;

static void stop_for_good(int i)
{
	pid_t pid = tracees[i].pid;
	/* pending before it runs a single instruction: it stops as soon as it is let go
	   (PTRACE_DETACH's own signal argument is ignored in an event stop) */
	kill(pid, SIGSTOP);
	ptrace(PTRACE_DETACH, pid, 0, 0);
	forget(pid);
	stopped(pid);
}

/* A new tracee at its first stop, its depth known: stop it for good, or let it run. */
static void first_stop(int i)
{
	pid_t pid = tracees[i].pid;
	if (tracees[i].depth >= target_depth && at_exec_mode) {
		tracees[i].at_exec = true; /* runs on until its exec event */
		ptrace(PTRACE_CONT, pid, 0, 0);
	} else if (tracees[i].depth >= target_depth) {
		stop_for_good(i);
	} else {
		ptrace(PTRACE_CONT, pid, 0, 0);
	}
}

static int trace(pid_t root, int depth)
{
	target_depth = depth;
	long options = PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE | (at_exec_mode ? PTRACE_O_TRACEEXEC : 0);
	/* every thread of root; again until no new one shows up (new ones of seized threads are ours anyway) */
	for (bool more = true; more;) {
		more = false;
		char path[64];
		snprintf(path, sizeof path, "/proc/%d/task", (int)root);
		DIR *dir = opendir(path);
		if (!dir) {
			perror(path);
			return 1;
		}
		for (struct dirent *e; (e = readdir(dir));) {
			pid_t tid = (pid_t)atoi(e->d_name);
			if (tid <= 0 || find(tid, false) >= 0)
				continue;
			if (ptrace(PTRACE_SEIZE, tid, 0, options) < 0) {
				perror("PTRACE_SEIZE");
				return 1;
			}
			int i = find(tid, true);
			tracees[i].known = true;
			more = true;
		}
		closedir(dir);
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		int status;
		pid_t pid = waitpid(-1, &status, __WALL);
		if (pid < 0) {
			if (errno == EINTR)
				continue;
			return errno == ECHILD ? 0 : 1;
		}
		if (WIFEXITED(status) || WIFSIGNALED(status)) {
			forget(pid);
			continue;
		}
		if (!WIFSTOPPED(status))
			continue;
		int event = status >> 16, sig = WSTOPSIG(status);
		int i = find(pid, true);
		if (i < 0) { /* table full: let it go */
			ptrace(PTRACE_DETACH, pid, 0, 0);
			continue;
		}
		if (event == PTRACE_EVENT_FORK || event == PTRACE_EVENT_VFORK || event == PTRACE_EVENT_CLONE) {
			unsigned long msg = 0;
			ptrace(PTRACE_GETEVENTMSG, pid, 0, &msg);
			int c = find((pid_t)msg, true);
			if (c >= 0) {
				tracees[c].depth = tracees[i].depth + (event == PTRACE_EVENT_CLONE ? 0 : 1);
				tracees[c].known = true;
				if (tracees[c].waiting) {
					tracees[c].waiting = false;
					first_stop(c);
				}
			}
			if (tracees[i].depth > 0 && event != PTRACE_EVENT_CLONE) {
				/* a process below PID has forked (a monitor its task): it runs on untraced,
				   its exit going to its parent at once, as without us */
				ptrace(PTRACE_DETACH, pid, 0, 0);
				forget(pid);
			} else {
				ptrace(PTRACE_CONT, pid, 0, 0);
			}
		} else if (event == PTRACE_EVENT_EXEC) {
			if (tracees[i].at_exec)
				stop_for_good(i);
			else
				ptrace(PTRACE_CONT, pid, 0, 0);
		} else if (event == PTRACE_EVENT_STOP) {
			/* a new tracee's first stop (a thread, or a process forked below PID), or a group-stop */
			if (!tracees[i].known)
				tracees[i].waiting = true; /* handled once its parent's event says what it is */
			else if (tracees[i].depth >= target_depth)
				first_stop(i);
			else
				ptrace(PTRACE_CONT, pid, 0, 0);
		} else {
			ptrace(PTRACE_CONT, pid, 0, sig); /* a signal for it: pass it on */
		}
	}
}

int main(int argc, char **argv)
{
	if (argc != 1 && argc != 3 && !(argc == 4 && strcmp(argv[3], "exec") == 0)) {
		fprintf(stderr, "usage: stopper [PID DEPTH [exec]]\n");
		return 2;
	}
	at_exec_mode = argc == 4;
	if (argc >= 3)
		return trace((pid_t)atoi(argv[1]), atoi(argv[2]));
	int fd = open("/proc/sys/kernel/ns_last_pid", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		perror("/proc/sys/kernel/ns_last_pid");
		return 1;
	}
	long self = getpid(), previous = last_pid(fd);
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		long now = last_pid(fd);
		if (now < 0)
			continue;
		if (now < previous) /* the pids wrapped: forget what was seen */
			memset(done, 0, sizeof done);
		/* forget the pids that fell behind the window: they may be used again later */
		for (long pid = previous - WINDOW; pid < now - WINDOW; pid++)
			if (pid > 0 && pid < PIDS)
				done[pid] = 0;
		previous = now;
		for (long pid = now - WINDOW / 2 + 1; pid <= now + WINDOW / 2; pid++) {
			if (pid <= 1 || pid >= PIDS || pid == self || done[pid])
				continue;
			if (kill((pid_t)pid, SIGSTOP) == 0) {
				done[pid] = 1;
				stopped(pid);
			}
		}
	}
}
