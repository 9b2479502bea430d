"""The Polyv wing: the endpoint's sign rule, phone numbers, the HTTP client and the simulator.

Nothing here imports Celery or the ledger; ``response`` imports nothing of the package at all,
so that :mod:`polyv_sms.errors` can name :class:`~polyv_sms.polyv.response.PolyvResponse`.
Import the modules themselves (``polyv_sms.polyv.client``, ``polyv_sms.polyv.simulator``):
this file stays empty so that importing one of them does not import the others.
"""
