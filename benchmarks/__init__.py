"""Benchmarks of polyv-sms against a bare Celery task: ``python -m benchmarks [--quick]``."""
