"""Training data: JSONL loading, chat templates, response-only masking, packing, embedded tasks."""
