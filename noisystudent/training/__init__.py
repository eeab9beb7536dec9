"""Training: the one loop every training step runs (engine), its loss, the BatchNorm pass, the student's
online targets, metrics tracking and the host-memory allocator setting. Imports the base and data."""
