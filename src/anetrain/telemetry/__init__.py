"""Telemetry: metrics.jsonl, FLOP accounting, the peak probe and the Efficiency Report."""
