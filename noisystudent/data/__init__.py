"""Data: shard patterns and streams, transforms, the embedded digits demo, image import."""
