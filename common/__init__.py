"""The base layer every package of the project imports (see README, Architecture).

Importing ``common`` installs the filters of :mod:`common.quiet` first: every entry point reaches
``common`` before Megatron-Core (``pretrain``, ``model`` and ``data_tools`` import it, and a rank
started by :mod:`common.distributed.spawn` unpickles its target from there before the function it runs),
so no process of the project prints Megatron's optional-dependency warnings.
"""

from common.quiet import silence_optional_dependency_warnings

silence_optional_dependency_warnings()
