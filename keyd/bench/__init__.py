"""Benchmarks (``keyd bench``): command picks a measurement; load is the socket load generator,
reference the bare server it is compared with, compare the Transit and PyJWT targets, stack the
processes a self-contained run starts, footprint memory and start-up, inprocess the CPU cost per
request without sockets; workload, report and options are what they share. Never imported by
keyd.daemon."""
