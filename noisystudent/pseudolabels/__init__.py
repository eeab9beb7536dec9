"""Pseudo-labels: running a model over the unlabeled shards (labeling), the confidence filter and class
balancing (selection), the audit against known labels, and temperature calibration. The label files they
write and read are a data format (data/labels.py), read by the student's streams."""
