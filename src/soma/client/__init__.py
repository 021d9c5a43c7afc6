"""The dispatching side: transport to workers and remote execution of plan blocks."""
