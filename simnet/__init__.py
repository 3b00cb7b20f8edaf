"""The simulated network: the real mesh code under a virtual clock, in one process."""
