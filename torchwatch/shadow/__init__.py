"""Two versions of a model side by side: offline (:func:`compare`) and on live traffic (:func:`shadow`).

The evidence for a canary deployment or a rollback. Built on public engine APIs only: a model's
watch is found with :func:`torchwatch.engine.watch_of`, and disagreement is raised into the
primary's watch with :meth:`torchwatch.Watch.publish`.
"""

from .compare import Comparison, ModuleDiff, OutputAgreement, compare
from .live import Shadow, shadow

__all__ = ["Comparison", "ModuleDiff", "OutputAgreement", "Shadow", "compare", "shadow"]
