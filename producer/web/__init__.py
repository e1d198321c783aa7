"""The HTTP edge of `podembed serve`: the API, the dashboard and its static files, and `/metrics`."""
