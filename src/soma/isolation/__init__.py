"""The filter daemon: user code in an isolated, persistent Python child, and its parent side."""
