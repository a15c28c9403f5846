"""The embedded CPU demo: a synthetic verifiable task, a tiny model, SFT vs RASFT end to end."""
