"""One container step, from its spec to its exit event: what it is (spec.py), its spool
and files (prepare.py), its tasks started and ended by the lifecycle oci.conf describes
(modes.py, runtime.py), the state machine that owns them (step.py), and its durable
record with the recovery that reads it after a daemon restart (record.py, recovery.py)."""
