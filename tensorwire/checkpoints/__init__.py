"""Moving model files between services that share no filesystem: chunked streams
(chunking), the sender (upload) and the verifying, installing receiver (receiver)."""
