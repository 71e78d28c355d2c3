"""Talking to systemd without libsystemd: socket activation, sd_notify and the watchdog,
journald's native protocol, and detached steps' output sent to the journal."""
