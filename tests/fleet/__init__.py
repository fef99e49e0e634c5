"""A labelled multi-scanner fleet, a scorer of the merge's identity resolution, and their tests."""
