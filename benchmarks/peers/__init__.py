"""The peers bench_e2e measures beside bilevel: one module per peer behind the interface in
base.py, timed by harness.py, run one per process by runner.py, summarised by summary.py."""
