"""Producer: parse transcripts, cut them into chunks, pack batches, enqueue, report job status."""
