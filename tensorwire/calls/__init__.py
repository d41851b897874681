"""Calling other services: channel pools, one Backoff, one Periodic loop, the HTTP(S)
repository pool, and the publishing links to the streamers."""
