"""Tensor and pipeline parallelism for the native engine: one model worker becomes a group of ranks.

``layout`` says which part of the model a rank holds (pure arithmetic, checked at start-up),
``shard`` cuts a checkpoint tensor to that part, ``comm`` holds the process groups and collectives the
model's forward uses (``shm``: their shared-memory path on one CPU machine), ``protocol`` is the
per-step message rank 0 sends the others, ``group`` starts and watches the follower ranks from rank 0,
``spawn`` forks them from a fork server that imported ``preload`` once, ``follower`` is their main
loop, and ``partition`` writes and reads ahead-of-time partitioned checkpoints (one file per rank).
"""
