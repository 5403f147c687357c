"""Center storage: the catalog database and the blob stores."""
