"""The teacher knowledge cache: its layout and encodings, and precompute (its Ray Data stages and the
encoders that run beside the teachers)."""
