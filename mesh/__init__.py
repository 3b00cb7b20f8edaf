"""The mesh: sans-I/O cores (membership, gossip, SWIM, election, the mesh core's policies) under
a thin I/O shell (`service`), over the transports in `transport/`."""
