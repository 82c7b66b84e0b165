"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+, Bell et al., CCS 2020): the
node learns only the sum of each cycle's diffs, even while workers drop out.

This package is the protocol's pure core, shared by node and worker, with no I/O:

* :mod:`~gridfl.secagg.params`: ``server_config.secure_aggregation`` and its descriptor;
* :mod:`~gridfl.secagg.shamir`: t-of-n secret sharing over GF(2**521 - 1);
* :mod:`~gridfl.secagg.crypto`: X25519, HKDF-SHA256, AES-GCM, the AES-CTR mask PRG;
* :mod:`~gridfl.secagg.quantize`: clipping and quantization into the field;
* :mod:`~gridfl.secagg.graph`: the SecAgg+ neighbour graph;
* :mod:`~gridfl.secagg.messages`: the stage messages;
* :mod:`~gridfl.secagg.worker` and :mod:`~gridfl.secagg.node`: the two sides' state
  machines. docs/secure-aggregation.md describes the protocol and its threat model.
"""

from gridfl.secagg.node import NodeSession
from gridfl.secagg.params import NAME, SecAggParams
from gridfl.secagg.worker import WorkerSession

__all__ = ["NAME", "NodeSession", "SecAggParams", "WorkerSession"]
