"""`sharedllm-node`: the command line (parser, commands, rendering)."""
