"""`evomerge bench`: throughput of merging, scoring and workers on this hardware."""
