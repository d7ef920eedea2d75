"""One forward for a network of PKM layers, whatever the framework: every layer in order,
and, when asked, the taps of every layer.

The PyTorch stacks, the Keras models, the seed baseline and the exporters all run their
layers through :func:`stack_forward`, so the tap contract (bare names for one layer,
``<i>/<tap>`` for each layer of more, see :func:`pkm_models.config.tap_names`) lives here
and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pkm_models.config import LAYER_OUTPUT

# call(layer, x, return_taps) -> the layer's output, or its dict of taps
LayerCall = Callable[[Any, Any, bool], Any]


def stack_forward(layers: Sequence[Any], x: Any, call: LayerCall, return_taps: bool = False) -> Any:
    """Apply ``layers`` in order to ``x``. Returns the last output, or with ``return_taps``
    a dict of taps: the layer's own for one layer, ``"<i>/<tap>"`` for every layer of more."""
    if not return_taps:
        for layer in layers:
            x = call(layer, x, False)
        return x
    if len(layers) == 1:
        return call(layers[0], x, True)
    taps = {}
    for i, layer in enumerate(layers):
        layer_taps = call(layer, x, True)
        taps.update({f"{i}/{name}": value for name, value in layer_taps.items()})
        x = layer_taps.get(LAYER_OUTPUT, layer_taps["output"])  # projected or gated, else the read
    return taps


def call_module(layer: Any, x: Any, return_taps: bool) -> Any:
    """The ``LayerCall`` of modules and Keras layers that take ``return_taps``."""
    return layer(x, return_taps=return_taps) if return_taps else layer(x)
