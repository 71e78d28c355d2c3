"""nodestepctl, the client: main.py picks the subcommand, run.py launches a step, commands.py
the rest; doctor and check-config need no daemon. The run, signal, cancel and wait paths
import nothing beyond the standard library and protocol.wire (start-up time)."""
