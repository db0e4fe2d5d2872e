"""dsv41.training: tokenizer and pretraining recipe that produced the bundled checkpoint."""
