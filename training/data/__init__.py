"""The data of a run: corpora, tokenizers, token shards, and training and evaluation batches."""
