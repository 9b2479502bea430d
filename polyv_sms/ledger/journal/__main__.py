"""``python -m polyv_sms.ledger.journal DIRECTORY...``: the open entries, as JSON lines."""

from polyv_sms.ledger.journal.inspect import main

if __name__ == "__main__":
    raise SystemExit(main())
