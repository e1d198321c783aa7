"""Worker: the cached model, the batch task, the Mongo store and ledger, the local worker loop."""
