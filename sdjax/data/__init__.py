"""Training data: tfds builders (captioned shapes, user captions), the grain input pipeline, a BPE trainer."""
