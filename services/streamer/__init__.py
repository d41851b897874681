"""tensorwire streamer: fans live training updates out to viewers."""
