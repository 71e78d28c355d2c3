"""nodestepd: run OCI container steps on a compute node, the way Slurm's oci.conf describes."""

__version__ = "0.1.0"
