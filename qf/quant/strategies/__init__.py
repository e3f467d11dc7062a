"""Quantizer strategies: the algorithms that choose a type's values, registered per type (see codecs.base).

Importing this package registers every strategy module listed in STRATEGY_MODULES.
"""

from qf.quant.strategies import iq4, legacy_k
from qf.quant.strategies import iq1  # IQ1_S, IQ1_M
from qf.quant.strategies import iq23  # IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S

STRATEGY_MODULES = (legacy_k, iq4, iq1, iq23)

__all__ = ["STRATEGY_MODULES"]
