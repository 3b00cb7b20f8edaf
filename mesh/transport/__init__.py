"""The transports under the mesh: the Transport seam, the libp2p adapter (control plane), the
TLS data plane, framing and tunnels."""
