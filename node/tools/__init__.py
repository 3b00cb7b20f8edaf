"""Developer tools shipped with the node but never used by serving: synthetic model files for
benchmarks and tests."""
