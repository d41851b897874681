"""tensorwire inference: the Open Inference Protocol over gRPC."""
