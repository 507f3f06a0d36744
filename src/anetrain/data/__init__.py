"""Data: token files (prepare, memory-mapped reading, validation), samplers, vocabulary compaction,
downloads, the embedded default's TinyStories excerpt and the story generator."""
