"""Data: token files (prepare, memory-mapped reading, validation), samplers, vocabulary compaction,
downloads and the embedded default (a TinyStories excerpt)."""
