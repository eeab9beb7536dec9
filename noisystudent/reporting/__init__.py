"""Reporting: evaluation of a model on an eval set (accuracy, per-class, calibration), the run's report
(report.md / report.json) and the plots every figure shares."""
