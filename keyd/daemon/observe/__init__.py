"""What keyd tells operators: the audit log and the metrics."""
