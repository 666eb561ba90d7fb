"""The embedding worker's engine: `EmbeddingsScheduler` batches texts, `EmbeddingsEngine` embeds them."""
