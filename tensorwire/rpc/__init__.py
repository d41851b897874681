"""Serving and securing RPCs: the gRPC server and its interceptor, typed settings,
lifecycle (signals), method names from descriptors, metrics, logging, tokens and TLS."""
