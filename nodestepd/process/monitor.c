/*
 * nodestepd-monitor: the parent of one task, outside the daemon (docs/monitor.md).
 *
 *   nodestepd-monitor --ctl-fd N --exit-fd M --uid U --gid G --groups G1,G2,... --cwd DIR
 *                     [--start-timeout-ms MS] [--exit-file-max BYTES] [--nofile SOFT:HARD]
 *                     [--userns-fd U --mntns-fd M] [--env-fd E]
 *                     [--pass-fd FD]... [--userns UIDSTART,UIDCOUNT,GIDSTART,GIDCOUNT]
 *                     -- PROGRAM ARG...
 *
 * --env-fd E: the task's environment (a sealed memfd the daemon wrote: "K=V" entries, each
 * ended by a NUL), read by the task's side only once it is the user, at most ARG_MAX
 * bytes (E2BIG beyond: "error ERRNO env"); without it the task's environment is empty.
 * Our own environment is never passed on, and the daemon gives us none: we are root for
 * the task's whole life, and the step's environment (built from what the user sent) must
 * not be read by anything running as root, the C library's start-up included
 * (GLIBC_TUNABLES, MALLOC_*, ...).
 *
 * --userns-fd/--mntns-fd (nodestep-oci's containers, docs/oci-proxy.md): the task enters
 * that user namespace, then that mount namespace, AFTER dropping to the user's uid, so the
 * kernel lets it in only where the user could go alone; it then works in its task dir
 * still (fchdir to the directory entered before).
 *
 * Started by nodestepd (as root, once per task). It forks PROGRAM as the user and
 * stays its parent, and the parent of whatever gets orphaned below it (it is a child
 * subreaper), so that a task's exit status is written down even while the daemon is
 * down: for every child that exits it appends "PID STATUS\n" to the exit file (fd M,
 * opened O_APPEND by the daemon), then sends "exit PID STATUS\n" on ctl.
 *
 * ctl (fd N) is one end of an AF_UNIX SOCK_SEQPACKET socketpair: one message per
 * record, so neither side ever sees half a line. We send, in order:
 *   "started PID\n"            the task was exec'ed (or "error ERRNO STEP\n", then exit 1)
 *   "exit PID STATUS\n"        per child, once, after its line is in the exit file
 *   "warning exit-file ERRNO\n" a record could not be written to the exit file
 *   "held PID\n"               the answer to "hold PID": its zombie will be kept
 * The daemon sends "hold PID\n" for a child it watches besides the task (a container's
 * init it adopted); closing its end (end-of-file for us) means "released": the daemon
 * let go of the task, or died. Until then the task and the children held stay zombies
 * once exited, so their pids and the process groups they lead cannot be reused while
 * the daemon still signals them (RunTimeKill with %p, a final SIGKILL to the group).
 * Every other child (an orphan nobody watches) is recorded and reaped as soon as it
 * exits: a task making orphans by the thousand must not hold as many pids. Once
 * released, we reap every zombie, then record and reap each child as it exits, and exit
 * 0 when none is left.
 *
 * The exit file is capped (--exit-file-max, 1 MiB by default): past it, only the records
 * of the task and of the children held are written (the ones a restarted daemon reads);
 * the others still go to ctl, and "warning exit-file EFBIG" is sent once.
 *
 * STATUS is the shell's: the exit code, or 128+N for death by signal N.
 *
 * Each --pass-fd FD (at most MAX_PASS_FDS, in order) reaches the task at fd 3, 4, ...
 * (`nodestepctl run --preserve-fds`, MPI's PMI fd); we close our copies once it runs.
 *
 * --userns UIDSTART,UIDCOUNT,GIDSTART,GIDCOUNT: the task (already the user) enters a new
 * user and mount namespace of its own, in which the user is root (0) and the user's
 * subordinate ids (the ranges given, the daemon's reading of /etc/subuid and /etc/subgid)
 * are 1..COUNT; we write its maps, as newuidmap would for the user (a PMIx MPI step's
 * runtime then maps the user to their own uid in the container: docs/admin-guide.md#mpi).
 *
 *   nodestepd-monitor --exec-as REPORT_FD ENV_FD UID GID G1,G2,... -- PROGRAM ARG...
 *
 * Another use of the same root-owned, statically linked program, which monitors nothing:
 * switch to the user (groups, gid, uid), then take PROGRAM's environment from ENV_FD and
 * exec PROGRAM (looked up in that environment's PATH), nothing else. The daemon starts its
 * short runtime commands (RunTimeQuery, RunTimeDelete, ...) through it (spawn.py): so it
 * can start them with vfork, which Python's subprocess does only for a child that keeps
 * our ids, instead of copying the daemon's page tables with fork (milliseconds per
 * command for a daemon of tens of MB).
 *
 * We are started as root with an EMPTY environment, as with --env-fd above: ENV_FD is read
 * only once we are the user (the same format and bound; E2BIG beyond, reported as "env")
 * and installed as our environ just before execvp, whose PATH search so runs as the user
 * with the user's PATH. Not argv: /proc/PID/cmdline is world-readable, the environment
 * is not.
 *
 * REPORT_FD and ENV_FD are made close-on-exec (PROGRAM gets neither): end-of-file on
 * REPORT_FD tells the daemon PROGRAM is exec'ed; if anything fails, "ERRNO STEP" is
 * written to it first and we exit 127.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PASS_FDS 8

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* What the task's child side was doing when it failed: sent with the errno. */
enum step { STEP_SETUP, STEP_CHDIR, STEP_GROUPS, STEP_GID, STEP_UID, STEP_USERNS, STEP_EXEC, STEP_TIMEOUT,
	    STEP_SETNS, STEP_ENV };
static const char *const step_names[] = {"setup", "chdir", "setgroups", "setgid", "setuid", "userns", "exec",
					 "timeout", "setns", "env"};

struct child {
	pid_t pid;
	int status;
	bool hold;   /* the task, or held for the daemon: kept a zombie until release */
	bool exited; /* recorded in the exit file */
	bool sent;   /* and on ctl (or there is no ctl any more) */
	bool reaped; /* reaped already (not held); kept until its record is sent */
	bool ack;    /* "held PID" still to send */
};

static struct child *children;
static size_t nchildren, children_cap;
static int ctl_fd = -1; /* -1 once released */
static int exit_fd = -1;
static long long exit_file_max = 1 << 20;
static long long exit_file_size; /* what we wrote to the exit file, and what it had at start */
static bool exit_file_full_said;

static void die(const char *what)
{
	/* Only reached before the task exists, or for a broken invariant: our stderr is the
	   task's, so say as little as possible there; the daemon learns it from ctl's EOF. */
	fprintf(stderr, "nodestepd-monitor: %s: %s\n", what, strerror(errno));
	exit(2);
}

/* ---- ctl -------------------------------------------------------------------------- */

static void release(void)
{
	if (ctl_fd >= 0) {
		close(ctl_fd);
		ctl_fd = -1;
	}
}

/* One message. 0: sent (or nobody to send to); 1: the daemon is not reading: try again
   when ctl is writable. Never blocks, never raises SIGPIPE: a daemon that stopped
   reading or died must not stop us recording. */
static int ctl_send(const char *msg)
{
	if (ctl_fd < 0)
		return 0;
	for (;;) {
		if (send(ctl_fd, msg, strlen(msg), MSG_DONTWAIT | MSG_NOSIGNAL) >= 0)
			return 0;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
			return 1;
		release(); /* EPIPE, ECONNRESET: the daemon is gone */
		return 0;
	}
}

/* ---- children ------------------------------------------------------------------------ */

/* The entry of a child not reaped yet (a reaped pid may be a new child's by now). */
static struct child *find_child(pid_t pid, bool add)
{
	for (size_t i = 0; i < nchildren; i++)
		if (children[i].pid == pid && !children[i].reaped)
			return &children[i];
	if (!add)
		return NULL;
	if (nchildren == children_cap) {
		size_t cap = children_cap ? children_cap * 2 : 16;
		struct child *grown = realloc(children, cap * sizeof *grown);
		if (!grown)
			die("realloc");
		children = grown;
		children_cap = cap;
	}
	children[nchildren] = (struct child){.pid = pid};
	return &children[nchildren++];
}

static void forget_child(struct child *c)
{
	*c = children[--nchildren];
}

static int shell_status(const siginfo_t *si)
{
	return si->si_code == CLD_EXITED ? si->si_status : 128 + si->si_status;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Write the child's status down: the exit file first (what survives us and the daemon),
   then ctl. No fsync: a crash of the node kills the tasks too, so there is nothing to
   recover; surviving the daemon only needs the page cache. */
static void record(struct child *c, int status)
{
	char line[64];
	c->exited = true;
	c->status = status;
	int len = snprintf(line, sizeof line, "%d %d\n", (int)c->pid, status);
	if (!c->hold && exit_file_size + len > exit_file_max) {
		/* full: only the records a restarted daemon reads (the task's, those held) go in */
		if (!exit_file_full_said) {
			char warning[64];
			snprintf(warning, sizeof warning, "warning exit-file %d\n", EFBIG);
			ctl_send(warning);
			exit_file_full_said = true;
		}
		return;
	}
	exit_file_size += len;
	if (write_all(exit_fd, line, (size_t)len) < 0) {
		char warning[64];
		snprintf(warning, sizeof warning, "warning exit-file %d\n", errno);
		ctl_send(warning); /* best effort: the exit record below matters more */
	}
}

/* Reap a child that is not held, once recorded. */
static void reap_now(struct child *c)
{
	siginfo_t reaped;
	memset(&reaped, 0, sizeof reaped);
	while (waitid(P_PID, (id_t)c->pid, &reaped, WEXITED | WNOHANG) < 0 && errno == EINTR)
		;
	c->reaped = true;
}

/* Send every answer and exit record not sent yet, oldest child first; forget the reaped
   children whose record is out. false: ctl is full. */
static bool flush_records(void)
{
	bool writable = true;
	for (size_t i = 0; i < nchildren && writable; i++) {
		struct child *c = &children[i];
		char msg[64];
		if (c->ack) {
			snprintf(msg, sizeof msg, "held %d\n", (int)c->pid);
			if (ctl_send(msg))
				writable = false;
			else
				c->ack = false;
		}
		if (writable && c->exited && !c->sent) {
			snprintf(msg, sizeof msg, "exit %d %d\n", (int)c->pid, c->status);
			if (ctl_send(msg))
				writable = false;
			else
				c->sent = true;
		}
	}
	for (size_t i = 0; i < nchildren;) {
		if (children[i].reaped && (children[i].sent || ctl_fd < 0))
			forget_child(&children[i]); /* moves the last entry here: look at i again */
		else
			i++;
	}
	return writable;
}

/* "hold PID": keep that child's zombie from now on, if it is still ours to keep. */
static void hold(const char *msg, size_t len)
{
	char buf[64];
	if (len >= sizeof buf || len < 6 || memcmp(msg, "hold ", 5) != 0)
		return; /* not a message we know: ignored */
	memcpy(buf, msg, len);
	buf[len] = '\0';
	char *end;
	long pid = strtol(buf + 5, &end, 10);
	if (pid <= 0 || (*end != '\n' && *end != '\0'))
		return;
	struct child *c = find_child((pid_t)pid, false);
	if (!c) {
		/* not seen yet: ours only if waitid finds it, running or a zombie not reaped */
		siginfo_t si;
		memset(&si, 0, sizeof si);
		if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) < 0)
			return; /* reaped already (its record says how it ended), or never ours */
		c = find_child((pid_t)pid, true);
	}
	c->hold = true;
	c->ack = true;
}

/* Not released: record every child that has exited; keep the task and the children held
   as zombies, reap the others.
   /proc/thread-self/children lists our children, zombies included (we are one thread).
   New children are appended at the end of the kernel's list; one we reap meanwhile is
   only left out, so one read sees every child. */
static void scan_children(void)
{
	static char *buf;
	static size_t cap;
	int fd = open("/proc/thread-self/children", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open /proc/thread-self/children");
	size_t len = 0;
	for (;;) {
		if (len + 1 >= cap) {
			size_t grown_cap = cap ? cap * 2 : 4096;
			char *grown = realloc(buf, grown_cap);
			if (!grown)
				die("realloc");
			buf = grown;
			cap = grown_cap;
		}
		ssize_t n = read(fd, buf + len, cap - len - 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("read /proc/thread-self/children");
		if (n == 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	buf[len] = '\0';
	for (char *p = buf, *end; *p; p = end) {
		long pid = strtol(p, &end, 10);
		if (end == p)
			break;
		struct child *c = find_child((pid_t)pid, true);
		if (c->exited)
			continue;
		siginfo_t si;
		memset(&si, 0, sizeof si);
		/* WNOWAIT: look, do not reap. */
		if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) < 0) {
			if (errno == ECHILD || errno == EINTR)
				continue; /* gone meanwhile (cannot happen: only we reap); look again at the next SIGCHLD */
			die("waitid");
		}
		if (si.si_pid != 0) {
			record(c, shell_status(&si));
			if (!c->hold)
				reap_now(c);
		}
	}
}

/* Released: record and reap every child that has exited. true when none is left. */
static bool reap_children(void)
{
	for (;;) {
		siginfo_t si;
		memset(&si, 0, sizeof si);
		if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ECHILD)
				return true;
			die("waitid");
		}
		if (si.si_pid == 0)
			return false; /* children left, all running */
		struct child *c = find_child(si.si_pid, true);
		if (!c->exited)
			record(c, shell_status(&si)); /* before the reap: the pid stays ours until written */
		siginfo_t reaped;
		memset(&reaped, 0, sizeof reaped);
		while (waitid(P_PID, (id_t)si.si_pid, &reaped, WEXITED | WNOHANG) < 0 && errno == EINTR)
			;
		forget_child(c);
	}
}

/* ---- the task ------------------------------------------------------------------------- */

struct options {
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	size_t ngroups;
	const char *cwd;
	long start_timeout_ms; /* how long the task may take to reach its exec */
	bool set_nofile;
	struct rlimit nofile; /* the users' RLIMIT_NOFILE, not the daemon's raised one */
	int userns_fd, mntns_fd; /* namespaces the task enters as the user (-1: none) */
	int pass_fds[MAX_PASS_FDS]; /* for the task at 3, 4, ... */
	int npass;
	bool userns; /* the task in a user namespace of its own: 0 = uid, 1.. = the subordinate ids */
	unsigned long long sub[4]; /* subuid start, count, subgid start, count */
	int env_fd; /* the task's environment, read as the user (-1: an empty one) */
	char **argv;
};

/* ---- the task's environment -------------------------------------------------------- */

/* The most execve takes for arguments and environment together, whatever the stack limit
   (the kernel's 3/4 of _STK_LIM): our bound on the environment read when sysconf's
   ARG_MAX (a quarter of the stack limit) says more, or nothing. */
#define EXEC_ARGS_MAX (6L << 20)

/* The environment for the program we exec (the step's, from what the user sent), read from
   env_fd (a regular file, the daemon's sealed memfd: "K=V" entries each ended by a NUL)
   once we are the user: an array for environ, or NULL with errno set (E2BIG past ARG_MAX,
   EINVAL for a malformed file). */
static char **read_env(int env_fd)
{
	long max = sysconf(_SC_ARG_MAX);
	if (max <= 0 || max > EXEC_ARGS_MAX)
		max = EXEC_ARGS_MAX;
	struct stat st;
	if (fstat(env_fd, &st) < 0)
		return NULL;
	if (!S_ISREG(st.st_mode)) {
		errno = EINVAL;
		return NULL;
	}
	if (st.st_size > max) {
		errno = E2BIG;
		return NULL;
	}
	size_t size = (size_t)st.st_size;
	char *data = malloc(size + 1);
	if (!data)
		return NULL;
	for (size_t got = 0; got < size;) {
		ssize_t n = pread(env_fd, data + got, size - got, (off_t)got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n == 0)
				errno = EINVAL; /* shorter than it said: it is sealed, so not ours */
			return NULL;
		}
		got += (size_t)n;
	}
	if (size > 0 && data[size - 1] != '\0') {
		errno = EINVAL;
		return NULL;
	}
	size_t count = 0;
	for (size_t k = 0; k < size; k++)
		count += data[k] == '\0';
	char **env = calloc(count + 1, sizeof *env);
	if (!env)
		return NULL;
	size_t k = 0;
	for (char *entry = data; entry < data + size; entry += strlen(entry) + 1) {
		if (!strchr(entry, '=') || entry[0] == '=') {
			errno = EINVAL;
			return NULL;
		}
		env[k++] = entry;
	}
	return env;
}

/* The fds to pass moved to 3, 4, ... (without close-on-exec), report_fd kept open above
   them: every source is first copied above all the targets, so that no move overwrites
   a source still to be moved. Returns report_fd's new number, or -1. */
static int place_pass_fds(const struct options *o, int report_fd)
{
	int high[MAX_PASS_FDS];
	int floor = 3 + o->npass;
	report_fd = fcntl(report_fd, F_DUPFD_CLOEXEC, floor);
	if (report_fd < 0)
		return -1;
	for (int k = 0; k < o->npass; k++)
		if ((high[k] = fcntl(o->pass_fds[k], F_DUPFD_CLOEXEC, floor)) < 0)
			return -1;
	for (int k = 0; k < o->npass; k++)
		if (dup2(high[k], 3 + k) < 0) /* dup2's copy has no close-on-exec */
			return -1;
	return report_fd;
}

static _Noreturn void child_failed(int report_fd, enum step step)
{
	int msg[2] = {errno, step};
	if (write(report_fd, msg, sizeof msg) < 0) {
		/* nothing left to tell anyone: the parent reads EOF and a status of 127 */
	}
	_exit(127);
}

/* In the forked child: become the task. Everything before execv runs as root, but for
   the user namespace: made as the user (who then owns it), its maps written by the parent
   (ask: the child's "mapped?", go: the parent's answer; both closed here after). */
/* Every signal at its default disposition and none blocked, whatever the process that
   started the daemon left ignored (a shell's background job ignores SIGINT and SIGQUIT,
   nohup SIGHUP): a program never inherits them from us. -1 when the mask cannot be set. */
static int default_signals(void)
{
	struct sigaction dfl;
	memset(&dfl, 0, sizeof dfl);
	dfl.sa_handler = SIG_DFL;
	for (int sig = 1; sig < NSIG; sig++)
		if (sig != SIGKILL && sig != SIGSTOP)
			sigaction(sig, &dfl, NULL); /* EINVAL for the C library's own signals: fine */
	sigset_t none;
	sigemptyset(&none);
	return sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Switch to the user for good: groups, gid, then uid. Every uid away from 0 clears the
   permitted, effective and ambient capabilities. -1 with errno and *failed set. */
static int become_user(const struct options *o, enum step *failed)
{
	if (setgroups(o->ngroups, o->groups) < 0) {
		*failed = STEP_GROUPS;
		return -1;
	}
	if (setresgid(o->gid, o->gid, o->gid) < 0) {
		*failed = STEP_GID;
		return -1;
	}
	if (setresuid(o->uid, o->uid, o->uid) < 0) {
		*failed = STEP_UID;
		return -1;
	}
	return 0;
}

static _Noreturn void become_task(const struct options *o, int report_fd, int ask, int go)
{
	if (default_signals() < 0)
		child_failed(report_fd, STEP_SETUP);
	/* Its own process group, led by the task, as the daemon's runtime commands get. */
	if (setpgid(0, 0) < 0)
		child_failed(report_fd, STEP_SETUP);
	/* As root: the daemon hands in its pinned fd on the task dir (/proc/PID/fd/N). */
	if (chdir(o->cwd) < 0)
		child_failed(report_fd, STEP_CHDIR);
	if (o->set_nofile && setrlimit(RLIMIT_NOFILE, &o->nofile) < 0)
		child_failed(report_fd, STEP_SETUP);
	enum step failed;
	if (become_user(o, &failed) < 0)
		child_failed(report_fd, failed);
	/* Root entered the directory; the user must be able to work in it too. */
	if (access(".", X_OK) < 0)
		child_failed(report_fd, STEP_CHDIR);
	if (o->userns_fd >= 0) {
		/* As the user: the kernel admits only the owner of the user namespace, and to the
		   mount namespace only with the capabilities that user namespace gives. Entering
		   a mount namespace moves the cwd to its root: back to the task dir after. */
		int here = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
		if (here < 0)
			child_failed(report_fd, STEP_CHDIR);
		if (setns(o->userns_fd, CLONE_NEWUSER) < 0 || setns(o->mntns_fd, CLONE_NEWNS) < 0)
			child_failed(report_fd, STEP_SETNS);
		if (fchdir(here) < 0)
			child_failed(report_fd, STEP_CHDIR);
		close(here);
	}
	if (o->userns) {
		char ok = 0;
		if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0)
			child_failed(report_fd, STEP_USERNS);
		if (write(ask, "m", 1) != 1 || read(go, &ok, 1) != 1 || ok != 'y') {
			errno = EPERM;
			child_failed(report_fd, STEP_USERNS);
		}
		close(ask);
		close(go);
	}
	/* As the user, and before the fds passed are moved (one may land on env_fd's number):
	   the task's environment, which nothing running as root reads (we were started with
	   none); an empty one without --env-fd. */
	char *empty[] = {NULL};
	char **env = empty;
	if (o->env_fd >= 0) {
		env = read_env(o->env_fd);
		if (!env)
			child_failed(report_fd, STEP_ENV);
		close(o->env_fd);
	}
	umask(022);
	if (o->npass > 0) {
		int moved = place_pass_fds(o, report_fd);
		if (moved < 0)
			child_failed(report_fd, STEP_SETUP);
		report_fd = moved;
	}
	/* Only 0, 1, 2 (and the fds passed, at 3...) survive the exec. CLOEXEC rather than
	   close: report_fd must stay open until the exec succeeds (which closes it, telling
	   the parent). */
	int first = 3 + o->npass;
	if (close_range((unsigned)first, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
		long max = sysconf(_SC_OPEN_MAX);
		for (int fd = first; fd < (max > 0 ? max : 65536); fd++)
			if (fd != report_fd)
				fcntl(fd, F_SETFD, FD_CLOEXEC); /* EBADF for fds not open: fine */
	}
	execve(o->argv[0], o->argv, env);
	child_failed(report_fd, STEP_EXEC);
}

/* The maps of the user namespace the child made (as the user): the user is 0 in it, the
   subordinate ids 1..COUNT. As root (CAP_SETUID/CAP_SETGID over the parent namespace) no
   setgroups "deny" is needed, and the groups the child has stay as they are. 0 or errno. */
static int write_maps(pid_t pid, const struct options *o)
{
	char path[64], map[128];
	const char *names[2] = {"uid_map", "gid_map"};
	unsigned long ids[2] = {(unsigned long)o->uid, (unsigned long)o->gid};
	for (int k = 0; k < 2; k++) {
		snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, names[k]);
		int len = snprintf(map, sizeof map, "0 %lu 1\n1 %llu %llu\n", ids[k], o->sub[2 * k], o->sub[2 * k + 1]);
		int fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			return errno;
		ssize_t n = write(fd, map, (size_t)len);
		int write_errno = errno;
		close(fd);
		if (n != len)
			return n < 0 ? write_errno : EIO;
	}
	return 0;
}

/* Fork the task. Returns its pid, or -1 with *err and *step when it could not start
   (the failed child is reaped). */
static pid_t start_task(const struct options *o, int *err, enum step *step)
{
	int report[2], sync_ask[2], sync_go[2];
	if (pipe2(report, O_CLOEXEC) < 0) {
		*err = errno;
		*step = STEP_SETUP;
		return -1;
	}
	if (pipe2(sync_ask, O_CLOEXEC) < 0 || pipe2(sync_go, O_CLOEXEC) < 0)
		die("pipe2");
	pid_t pid = fork();
	if (pid < 0) {
		*err = errno;
		*step = STEP_SETUP;
		close(report[0]);
		close(report[1]);
		close(sync_ask[0]);
		close(sync_ask[1]);
		close(sync_go[0]);
		close(sync_go[1]);
		return -1;
	}
	if (pid == 0) {
		close(report[0]);
		close(sync_ask[0]);
		close(sync_go[1]);
		become_task(o, report[1], sync_ask[1], sync_go[0]);
	}
	close(report[1]);
	close(sync_ask[1]);
	close(sync_go[0]);
	/* From its uid switch on, the child is the user's: any process of theirs can stop it
	   (SIGSTOP) before its exec. So the wait for that exec has a deadline; past it the
	   child is killed and the start reported as failed ("error ETIMEDOUT timeout"). */
	struct timespec now, end;
	clock_gettime(CLOCK_MONOTONIC, &end);
	end.tv_sec += o->start_timeout_ms / 1000;
	end.tv_nsec += (o->start_timeout_ms % 1000) * 1000000L;
	if (end.tv_nsec >= 1000000000L) {
		end.tv_sec++;
		end.tv_nsec -= 1000000000L;
	}
	bool asked = !o->userns; /* only a task making a user namespace asks for its maps */
	for (;;) {
		clock_gettime(CLOCK_MONOTONIC, &now);
		long long left = (end.tv_sec - now.tv_sec) * 1000LL + (end.tv_nsec - now.tv_nsec) / 1000000L;
		struct pollfd p[2] = {{.fd = report[0], .events = POLLIN}, {.fd = sync_ask[0], .events = POLLIN}};
		int ready = left > 0 ? poll(p, asked ? 1 : 2, left > INT_MAX ? INT_MAX : (int)left) : 0;
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready < 0)
			die("poll");
		if (ready > 0 && !asked && (p[1].revents & POLLIN) && !(p[0].revents & (POLLIN | POLLHUP))) {
			char m;
			asked = true;
			if (read(sync_ask[0], &m, 1) == 1) {
				int map_errno = write_maps(pid, o);
				if (map_errno == 0 && write(sync_go[1], "y", 1) == 1)
					continue;
				kill(pid, SIGKILL);
				while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
					;
				close(report[0]);
				close(sync_ask[0]);
				close(sync_go[1]);
				*err = map_errno ? map_errno : EIO;
				*step = STEP_USERNS;
				return -1;
			}
			continue; /* the child went before asking: its report says why */
		}
		if (ready > 0)
			break;
		kill(pid, SIGKILL); /* our unreaped child: the pid is still its own */
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
		close(report[0]);
		close(sync_ask[0]);
		close(sync_go[1]);
		*err = ETIMEDOUT;
		*step = STEP_TIMEOUT;
		return -1;
	}
	close(sync_ask[0]);
	close(sync_go[1]);
	int msg[2];
	ssize_t n;
	do
		n = read(report[0], msg, sizeof msg);
	while (n < 0 && errno == EINTR);
	int read_errno = errno;
	close(report[0]);
	if (n == 0)
		return pid; /* the exec closed the pipe */
	*err = n == (ssize_t)sizeof msg ? msg[0] : n < 0 ? read_errno : EIO;
	*step = n == (ssize_t)sizeof msg && msg[1] >= 0 && msg[1] <= STEP_ENV && msg[1] != STEP_TIMEOUT
		? (enum step)msg[1] : STEP_SETUP;
	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;
	return -1;
}

/* ---- start-up ------------------------------------------------------------------------ */

static _Noreturn void usage(const char *problem)
{
	fprintf(stderr,
		"nodestepd-monitor: %s\n"
		"usage: nodestepd-monitor --ctl-fd N --exit-fd M --uid U --gid G --groups G1,G2,... --cwd DIR"
		" [--start-timeout-ms MS] [--exit-file-max BYTES] [--nofile SOFT:HARD] [--pass-fd FD]..."
		" [--userns UIDSTART,UIDCOUNT,GIDSTART,GIDCOUNT] [--userns-fd U --mntns-fd M] [--env-fd E]"
		" -- PROGRAM ARG...\n"
		"   or: nodestepd-monitor --exec-as REPORT_FD ENV_FD UID GID G1,G2,... -- PROGRAM ARG...\n"
		"(started by nodestepd, once per task or runtime command; see docs/monitor.md)\n",
		problem);
	if (ctl_fd >= 0) {
		char msg[64];
		snprintf(msg, sizeof msg, "error %d setup\n", EINVAL);
		ctl_send(msg);
	}
	exit(2);
}

/* A decimal number in [0, max]; no sign, no spaces, nothing after it. */
static bool parse_number(const char *s, unsigned long long max, unsigned long long *out)
{
	if (*s < '0' || *s > '9')
		return false;
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end || v > max)
		return false;
	*out = v;
	return true;
}

static int parse_fd(const char *s)
{
	unsigned long long v;
	if (!parse_number(s, INT_MAX, &v) || v < 3)
		usage("fds must be numbers above 2");
	return (int)v;
}

static void parse_groups(const char *list, struct options *o)
{
	size_t n = *list ? 1 : 0;
	for (const char *p = list; *p; p++)
		n += *p == ',';
	if (n > (size_t)NGROUPS_MAX)
		usage("too many groups");
	o->groups = calloc(n ? n : 1, sizeof *o->groups);
	if (!o->groups)
		die("calloc");
	char *copy = strdup(list);
	if (!copy)
		die("strdup");
	char *save = NULL;
	for (char *g = strtok_r(copy, ",", &save); g; g = strtok_r(NULL, ",", &save)) {
		unsigned long long v;
		if (!parse_number(g, (gid_t)-2, &v))
			usage("--groups: not a list of gids");
		o->groups[o->ngroups++] = (gid_t)v;
	}
	if (o->ngroups != n)
		usage("--groups: empty entry");
	free(copy);
}

static void parse_args(int argc, char **argv, struct options *o)
{
	bool have_uid = false, have_gid = false, have_groups = false;
	int i = 1;
	/* ctl first, so that every later complaint also reaches the daemon */
	for (int j = 1; j + 1 < argc && strcmp(argv[j], "--") != 0; j += 2)
		if (strcmp(argv[j], "--ctl-fd") == 0) {
			unsigned long long v;
			if (parse_number(argv[j + 1], INT_MAX, &v) && v > 2)
				ctl_fd = (int)v;
		}
	for (; i < argc && strcmp(argv[i], "--") != 0; i += 2) {
		if (i + 1 >= argc)
			usage("an option without its value");
		const char *name = argv[i], *value = argv[i + 1];
		unsigned long long v;
		if (strcmp(name, "--ctl-fd") == 0) {
			ctl_fd = parse_fd(value);
		} else if (strcmp(name, "--exit-fd") == 0) {
			exit_fd = parse_fd(value);
		} else if (strcmp(name, "--uid") == 0) {
			if (!parse_number(value, (uid_t)-2, &v))
				usage("--uid: not a uid");
			o->uid = (uid_t)v;
			have_uid = true;
		} else if (strcmp(name, "--gid") == 0) {
			if (!parse_number(value, (gid_t)-2, &v))
				usage("--gid: not a gid");
			o->gid = (gid_t)v;
			have_gid = true;
		} else if (strcmp(name, "--groups") == 0) {
			parse_groups(value, o);
			have_groups = true;
		} else if (strcmp(name, "--cwd") == 0) {
			o->cwd = value;
		} else if (strcmp(name, "--userns-fd") == 0) {
			o->userns_fd = parse_fd(value);
		} else if (strcmp(name, "--mntns-fd") == 0) {
			o->mntns_fd = parse_fd(value);
		} else if (strcmp(name, "--nofile") == 0) {
			char *colon = strchr(value, ':');
			unsigned long long soft, hard;
			if (!colon)
				usage("--nofile: not SOFT:HARD");
			*colon = '\0';
			if (!parse_number(value, INT_MAX, &soft) || !parse_number(colon + 1, INT_MAX, &hard) || soft > hard)
				usage("--nofile: not SOFT:HARD");
			o->nofile.rlim_cur = soft;
			o->nofile.rlim_max = hard;
			o->set_nofile = true;
		} else if (strcmp(name, "--env-fd") == 0) {
			o->env_fd = parse_fd(value);
			if (fcntl(o->env_fd, F_GETFD) < 0)
				usage("--env-fd: not an open fd");
		} else if (strcmp(name, "--pass-fd") == 0) {
			if (o->npass == MAX_PASS_FDS)
				usage("more than 8 --pass-fd");
			o->pass_fds[o->npass] = parse_fd(value);
			if (fcntl(o->pass_fds[o->npass], F_GETFD) < 0)
				usage("--pass-fd: not an open fd");
			o->npass++;
		} else if (strcmp(name, "--userns") == 0) {
			char copy[128];
			if (strlen(value) >= sizeof copy)
				usage("--userns: not UIDSTART,UIDCOUNT,GIDSTART,GIDCOUNT");
			strcpy(copy, value);
			char *rest = copy;
			for (int k = 0; k < 4; k++) {
				char *comma = strchr(rest, ',');
				if ((k < 3) != (comma != NULL))
					usage("--userns: not UIDSTART,UIDCOUNT,GIDSTART,GIDCOUNT");
				if (comma)
					*comma = '\0';
				if (!parse_number(rest, 0xFFFFFFFEULL, &o->sub[k]) || (k % 2 == 1 && o->sub[k] == 0))
					usage("--userns: not UIDSTART,UIDCOUNT,GIDSTART,GIDCOUNT");
				rest = comma ? comma + 1 : rest;
			}
			if (o->sub[0] + o->sub[1] > 0xFFFFFFFFULL || o->sub[2] + o->sub[3] > 0xFFFFFFFFULL)
				usage("--userns: a range beyond the last id");
			o->userns = true;
		} else if (strcmp(name, "--exit-file-max") == 0) {
			if (!parse_number(value, 1ULL << 40, &v))
				usage("--exit-file-max: not a number of bytes");
			exit_file_max = (long long)v;
		} else if (strcmp(name, "--start-timeout-ms") == 0) {
			if (!parse_number(value, 3600000, &v) || v == 0)
				usage("--start-timeout-ms: not a number of milliseconds from 1 to 3600000");
			o->start_timeout_ms = (long)v;
		} else {
			usage("unknown option");
		}
	}
	if (ctl_fd < 0 || exit_fd < 0 || !have_uid || !have_gid || !have_groups || !o->cwd)
		usage("every option is required");
	if (ctl_fd == exit_fd)
		usage("--ctl-fd and --exit-fd are the same fd");
	if ((o->userns_fd < 0) != (o->mntns_fd < 0))
		usage("--userns-fd and --mntns-fd go together");
	if (o->userns_fd >= 0 && o->userns)
		usage("--userns-fd (enter one) and --userns (make one) exclude each other");
	for (int k = 0; k < o->npass; k++)
		if (o->pass_fds[k] == ctl_fd || o->pass_fds[k] == exit_fd || o->pass_fds[k] == o->env_fd)
			usage("--pass-fd is --ctl-fd, --exit-fd or --env-fd");
	if (o->env_fd >= 0 && (o->env_fd == ctl_fd || o->env_fd == exit_fd))
		usage("--env-fd is --ctl-fd or --exit-fd");
	if (i + 1 >= argc || argv[i + 1][0] != '/')
		usage("no absolute PROGRAM after --");
	o->argv = &argv[i + 1];
}

/* ctl must be a SOCK_SEQPACKET socket and the exit file open for appending: anything
   else would lose or tear records. */
static void check_fds(void)
{
	int type;
	socklen_t len = sizeof type;
	if (getsockopt(ctl_fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_SEQPACKET)
		usage("--ctl-fd is not a SOCK_SEQPACKET socket");
	int flags = fcntl(exit_fd, F_GETFL);
	if (flags < 0 || (flags & O_ACCMODE) == O_RDONLY || !(flags & O_APPEND))
		usage("--exit-fd is not open for appending");
	/* Ours alone: the task must not inherit them (it gets 0-2 only anyway). */
	if (fcntl(ctl_fd, F_SETFD, FD_CLOEXEC) < 0 || fcntl(exit_fd, F_SETFD, FD_CLOEXEC) < 0)
		die("fcntl");
}

/* ---- --exec-as --------------------------------------------------------------------------- */

static _Noreturn void exec_as_failed(int report_fd, enum step step)
{
	char msg[64];
	int n = snprintf(msg, sizeof msg, "%d %s", errno, step_names[step]);
	if (write(report_fd, msg, (size_t)n) < 0) {
		/* nothing left to tell anyone: the daemon reads EOF and a status of 127 */
	}
	_exit(127);
}

/* Everything else (cwd, umask, process group, fds) the daemon's vfork child set before
   exec'ing us, as root: we only drop to the user, take the environment, put every signal
   at its default (subprocess restores only SIGPIPE and SIGXFSZ), and exec.
   As root we read only the daemon's own words (the fds and ids); PROGRAM and its
   arguments (the step's) are passed on untouched, the environment read as the user. */
static _Noreturn void exec_as(int argc, char **argv)
{
	struct options o = {0};
	unsigned long long v;
	if (argc < 9 || strcmp(argv[7], "--") != 0)
		usage("--exec-as REPORT_FD ENV_FD UID GID G1,G2,... -- PROGRAM ARG...");
	int report_fd = parse_fd(argv[2]);
	int env_fd = parse_fd(argv[3]);
	if (!parse_number(argv[4], (uid_t)-2, &v))
		usage("--exec-as: not a uid");
	o.uid = (uid_t)v;
	if (!parse_number(argv[5], (gid_t)-2, &v))
		usage("--exec-as: not a gid");
	o.gid = (gid_t)v;
	parse_groups(argv[6], &o);
	if (fcntl(report_fd, F_SETFD, FD_CLOEXEC) < 0)
		exec_as_failed(report_fd, STEP_SETUP);
	if (fcntl(env_fd, F_SETFD, FD_CLOEXEC) < 0)
		exec_as_failed(report_fd, STEP_ENV);
	enum step failed;
	if (become_user(&o, &failed) < 0)
		exec_as_failed(report_fd, failed);
	char **env = read_env(env_fd);
	if (!env)
		exec_as_failed(report_fd, STEP_ENV);
	close(env_fd);
	if (default_signals() < 0)
		exec_as_failed(report_fd, STEP_SETUP);
	environ = env;
	execvp(argv[8], &argv[8]);
	exec_as_failed(report_fd, STEP_EXEC);
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--exec-as") == 0)
		exec_as(argc, argv);
	struct options o = {.start_timeout_ms = 60000, .userns_fd = -1, .mntns_fd = -1, .env_fd = -1};
	parse_args(argc, argv, &o);
	check_fds();

	/* Our own session: a signal to the daemon's process group, or a hang-up of its
	   terminal, must not reach us. The daemon never starts us as a group leader. */
	if (setsid() < 0)
		die("setsid");
	/* Orphans below us (a container's init left by RunTimeCreate) become our children. */
	if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
		die("prctl(PR_SET_CHILD_SUBREAPER)");
	/* Whoever stops the daemon (systemd's SIGTERM to its cgroup, a ^C) must not stop us. */
	struct sigaction ign;
	memset(&ign, 0, sizeof ign);
	ign.sa_handler = SIG_IGN;
	const int ignored[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGPIPE};
	for (size_t k = 0; k < sizeof ignored / sizeof ignored[0]; k++)
		if (sigaction(ignored[k], &ign, NULL) < 0)
			die("sigaction");
	/* SIGCHLD through a signalfd, blocked before the fork so that no exit goes unseen.
	   Its disposition stays SIG_DFL: SIG_IGN would make the kernel reap children for us. */
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &chld, NULL) < 0)
		die("sigprocmask");
	int sfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sfd < 0)
		die("signalfd");

	int err = 0;
	enum step step = STEP_SETUP;
	pid_t task = start_task(&o, &err, &step);
	if (o.env_fd >= 0)
		close(o.env_fd); /* the task's, not ours: nothing of the task's is held once it runs */
	char msg[64];
	if (task < 0) {
		snprintf(msg, sizeof msg, "error %d %s\n", err, step_names[step]);
		ctl_send(msg);
		return 1;
	}
	/* The task's stdio and the fds passed to it are the task's: holding them would keep a
	   pipe, a client's terminal or a PMI channel open after the task is gone. Nothing here
	   may block the daemon's view of EOF. */
	for (int k = 0; k < o.npass; k++)
		if (o.pass_fds[k] > 2)
			close(o.pass_fds[k]);
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0)
		die("/dev/null");
	if (null > 2)
		close(null);
	if (chdir("/") < 0) /* pin no directory */
		die("chdir /");
	snprintf(msg, sizeof msg, "started %d\n", (int)task);
	ctl_send(msg); /* the first message on an empty socket: it fits */
	find_child(task, true)->hold = true;
	struct stat st;
	exit_file_size = fstat(exit_fd, &st) == 0 ? st.st_size : 0;

	bool writable = true;
	for (;;) {
		if (ctl_fd >= 0) {
			scan_children();
			writable = flush_records();
		}
		if (ctl_fd < 0 && reap_children())
			return 0;
		struct pollfd fds[2] = {
			{.fd = sfd, .events = POLLIN},
			{.fd = ctl_fd, .events = (short)(POLLIN | (writable ? 0 : POLLOUT))},
		};
		if (poll(fds, ctl_fd >= 0 ? 2 : 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (fds[0].revents) {
			struct signalfd_siginfo info;
			while (read(sfd, &info, sizeof info) > 0)
				; /* one scan covers every SIGCHLD queued */
		}
		/* Every message first: a "hold" sent before the child's exit must be seen before the
		   scan that would otherwise reap it. */
		while (ctl_fd >= 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) {
			char buf[256];
			ssize_t n = recv(ctl_fd, buf, sizeof buf, MSG_DONTWAIT);
			if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
				break;
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				release(); /* the daemon let go of the task, or died */
				break;
			}
			hold(buf, (size_t)n);
		}
	}
}
