"""The worker wire protocol: message types, the v1 JSON codec and the v2 binary codec."""
