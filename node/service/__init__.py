"""Running the node as a service: a systemd unit on Linux, a launchd agent on macOS."""
