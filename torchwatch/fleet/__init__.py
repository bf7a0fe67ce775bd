"""Replicas compared with each other: who each one is (:mod:`.identity`), what its canary and
weights give (:mod:`.probe`), how a set of them is judged (:mod:`.judge`), the exchange over
``torch.distributed`` (:mod:`.exchange`) and the same comparison from Prometheus (:mod:`.promql`)."""

from .identity import Identity, identity, replica_name

__all__ = ["Identity", "identity", "replica_name"]
