"""Data: shard patterns and streams, transforms, the pseudo-label file format, the DALI path, the embedded
digits demo, image import. Imports only the base (errors, files, config, rundir)."""
