"""The mesh: identity, membership, gossip and streams between SharedLLM nodes."""
