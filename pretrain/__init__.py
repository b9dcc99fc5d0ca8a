import common  # noqa: F401  (first: installs common.quiet's warning filters before anything imports Megatron)
