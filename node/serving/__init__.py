"""This node's part in serving the mesh's models: the election driver, the engines' jobs,
tunnels and routing."""
