"""tensorwire trainer: PyTorch training runs that never wait on the network."""
