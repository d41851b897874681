"""Data on the wire: tensors and the Open Inference Protocol codec, packed arrays,
scalar buckets."""
