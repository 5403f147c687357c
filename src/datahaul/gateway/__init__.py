"""The vehicle-side HTTP gateway, its ledger and its store-and-forward outbox."""
