"""Codecs keyed by ggml type id: a layout per type (this package) and quantizer strategies (qf.quant.strategies).

Importing this package registers every layout and strategy class; instances (and any tables) are built on
first use by get_codec / get_layout.
"""

from qf.quant.codecs import floats, iq4, kquants, legacy
from qf.quant.codecs import iq1  # noqa: E402  (IQ1_S, IQ1_M)
from qf.quant.codecs import iq23  # noqa: E402  (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S)
from qf.quant.codecs.base import Codec, Layout, Strategy, get_codec, get_layout, registered_types, strategies

LAYOUT_MODULES = (floats, legacy, kquants, iq4, iq1, iq23)  # each registers its layout classes on import

from qf.quant import strategies as _strategies  # noqa: E402  (registers the strategies; they import the layouts)

__all__ = ["LAYOUT_MODULES", "Codec", "Layout", "Strategy", "get_codec", "get_layout", "registered_types",
           "strategies"]
