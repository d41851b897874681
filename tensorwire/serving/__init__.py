"""The serving core, protobuf-free: batching, the model loader, the repository on disk
and Triton's config.pbtxt, admission bounds, the response cache, built-in model kinds
and devices."""
