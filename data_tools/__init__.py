"""Offline data tools: shard building (WebDataset + energon metadata), inspection, statistics, synthetic data.

Run ``python -m data_tools --help`` for the commands. The sample format of built shards is described in
``data_tools.schema``; media decoding lives in ``common.media.decode``.
"""

