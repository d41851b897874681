"""A synthetic viewer that measures, per streamer replica, how old the live state is."""
