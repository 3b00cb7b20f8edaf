"""The node: its subsystems (`engine`, `models`, `weights`, `api`, `serving`, `cli`), its
configuration, and the daemon that wires them together."""
