"""The command-line wing: ``polyv-sms`` (``command``), its output (``formatting``), the helpers
that run a simulator, a worker or supervisord (``run``) and the embedded demo (``demo``)."""

from __future__ import annotations

from polyv_sms.cli.command import main

__all__ = ["main"]
