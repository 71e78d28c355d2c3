"""nodestep-oci: the OCI runtime command line podman (conmon) and rootless docker
(containerd-shim-runc-v2) call in place of runc, each container becoming a nodestepd step.

cli.py parses what the engines pass and talks to the daemon; anchor.py is the process
`create` leaves in the engine's process tree for the container's life (docs/oci-proxy.md).
Standard library, ctl.transport and protocol.wire only, like nodestepctl's launch path.
"""
