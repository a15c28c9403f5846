"""Rollouts: the vLLM server (start/stop/attach), the batched client, in-place weight refresh.

Nothing here imports vLLM: the server is a child process spoken to over HTTP.
"""
