"""Quantizer strategies: the algorithms that choose a type's values, registered per type (see codecs.base).

Importing this package registers every strategy module listed in STRATEGY_MODULES.
"""

from qf.quant.strategies import iq4, legacy_k
from qf.quant.strategies import iq1  # IQ1_S, IQ1_M

STRATEGY_MODULES = (legacy_k, iq4, iq1)

__all__ = ["STRATEGY_MODULES"]
