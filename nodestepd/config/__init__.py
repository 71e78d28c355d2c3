"""Configuration as pure parsing and checking: the daemon's settings, Slurm's oci.conf with
its patterns and POSIX regexes, and what nodestepd reads of slurm.conf. Nothing here acts
on the node."""
