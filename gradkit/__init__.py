"""gradkit: differentiate JAX programs and trust the result.

The public modules are :mod:`gradkit.activations`, :mod:`gradkit.derivatives`,
:mod:`gradkit.layers`, :mod:`gradkit.recurrent`, :mod:`gradkit.diagnostics` and
:mod:`gradkit.training`; the most used names are re-exported here.
"""

__version__ = "0.1.0"

from gradkit import activations as activations
from gradkit import derivatives as derivatives
from gradkit import diagnostics as diagnostics
from gradkit import layers as layers
from gradkit import recurrent as recurrent
from gradkit import training as training
