"""Pure init/apply layers (Dense, MLP) over plain pytrees, and weight initializers.

A layer is a small immutable object with two pure functions, in the style of
``jax.example_libraries.stax``: ``init(key, input_shape) -> params`` builds a dict of arrays and
``apply(params, x) -> y`` computes the output. Parameters are plain nested dicts, so they work
with ``jax.grad``, optax, ``jax.jit``, ``jax.vmap`` and sharding with no framework in between.

The dtype policy is Theano's ``floatX`` done the JAX way: parameters are created in JAX's default
float (float32, or float64 when ``jax_enable_x64`` is on) unless ``param_dtype`` says otherwise,
and the computation runs in the promoted dtype of the input and the parameters unless ``dtype``
says otherwise.

Shape errors are raised while tracing, before any computation, and name the layer, the expected
and the actual shape and the line of the caller's code that applied the layer: the answer to
Theano's test values.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import initializers as _jax_init
from jax.typing import ArrayLike, DTypeLike

from gradkit import _probe

__all__ = [
    "MLP",
    "Dense",
    "constant",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "lecun_normal",
    "normal",
    "ones",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
]

Initializer = Callable[..., jax.Array]
Activation = str | Callable[[jax.Array], jax.Array] | None
PyTree = Any


# --------------------------------------------------------------------------------------------
# Initializers
# --------------------------------------------------------------------------------------------


class _VarianceScaling:
    """A ``jax.nn.initializers`` variance-scaling initializer usable with or without a call.

    ``glorot_uniform(key, shape, dtype)`` initializes directly, as the issue's ``(key, shape,
    dtype) -> array`` contract says; ``glorot_uniform()`` or ``glorot_uniform(in_axis=0)`` returns a
    configured initializer, as ``jax.nn.initializers.glorot_uniform()`` does, so code written for
    either convention works. The arithmetic is jax's own.
    """

    def __init__(self, name: str, factory: Callable[..., Initializer], **config: Any):
        self._name = name
        self._factory = factory
        self._config = config
        self.__name__ = name
        self.__doc__ = (
            f"``jax.nn.initializers.{factory.__name__}``: call as ``{name}(key, shape, dtype)`` "
            f"or configure with ``{name}(in_axis=..., out_axis=..., batch_axis=..., "
            "dtype=...)``."
        )

    def __call__(
        self,
        key: jax.Array | None = None,
        shape: Sequence[int] | None = None,
        dtype: DTypeLike | None = None,
        **config: Any,
    ) -> Any:
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            # jax's positional configuration: glorot_uniform(in_axis, out_axis, batch_axis).
            positional = {"in_axis": key, "out_axis": shape, "batch_axis": dtype}
            given = {k: v for k, v in positional.items() if v is not None}
            return _VarianceScaling(
                self._name, self._factory, **{**self._config, **given, **config}
            )
        if isinstance(key, (tuple, list)):
            raise TypeError(
                f"{self._name}: the first argument is the PRNG key, got {key!r} (a shape?): "
                f"{self._name}(key, shape, dtype)"
            )
        if key is None:
            if shape is not None:
                raise TypeError(f"{self._name}: pass a PRNG key first: {self._name}(key, shape)")
            if dtype is not None:  # jax's configuration keyword: the default dtype
                config = {**config, "dtype": dtype}
            return _VarianceScaling(self._name, self._factory, **{**self._config, **config})
        if config:
            raise TypeError(
                f"{self._name}: configure first, then initialize: "
                f"{self._name}({', '.join(f'{k}=...' for k in config)})(key, shape)"
            )
        if shape is None:
            raise TypeError(f"{self._name}: missing the shape: {self._name}(key, shape, dtype)")
        initializer = self._factory(**self._config)
        if dtype is None:  # the configured dtype, else jax's default float
            return initializer(key, tuple(shape))
        return initializer(key, tuple(shape), dtype)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        return f"gradkit.layers.{self._name}({args})"


glorot_normal = _VarianceScaling("glorot_normal", _jax_init.glorot_normal)
glorot_uniform = _VarianceScaling("glorot_uniform", _jax_init.glorot_uniform)
xavier_normal = glorot_normal
xavier_uniform = glorot_uniform
he_normal = _VarianceScaling("he_normal", _jax_init.he_normal)
he_uniform = _VarianceScaling("he_uniform", _jax_init.he_uniform)
lecun_normal = _VarianceScaling("lecun_normal", _jax_init.lecun_normal)
zeros = _jax_init.zeros
ones = _jax_init.ones


def normal(stddev: float = 1e-2) -> Initializer:
    r"""Returns an initializer drawing from :math:`\mathcal{N}(0, \mathrm{stddev}^2)`.

    This is ``jax.nn.initializers.normal``; seed 004's ``N(0, 1e-3)`` layer is ``normal(1e-3)``.

    Args:
      stddev: the standard deviation (not the variance).

    Returns:
      An initializer ``(key, shape, dtype) -> array``.

    Example:
      >>> import jax
      >>> w = normal(1e-3)(jax.random.key(0), (2, 3))
      >>> w.shape, str(w.dtype)
      ((2, 3), 'float32')
    """
    return _jax_init.normal(stddev)


def constant(value: ArrayLike) -> Initializer:
    """Returns an initializer filling every entry with ``value`` (``jax.nn.initializers.constant``).

    Args:
      value: the fill value (seed 001 initializes every bias to 1: ``constant(1.0)``).

    Returns:
      An initializer ``(key, shape, dtype) -> array``.

    Example:
      >>> import jax
      >>> constant(1.0)(jax.random.key(0), (3,)).tolist()
      [1.0, 1.0, 1.0]
    """
    return _jax_init.constant(value)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (jax, __import__("jaxlib"))
)
_GRADKIT_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_GRADKIT_EXAMPLES = os.path.join(_GRADKIT_DIR, "_examples") + os.sep


def _caller_line() -> str:
    """Returns ``" (called at file:line: `code`)"`` for the innermost frame of user code."""
    for frame in reversed(traceback.extract_stack()):
        filename = os.path.abspath(frame.filename)
        in_gradkit = filename.startswith(_GRADKIT_DIR) and not filename.startswith(
            _GRADKIT_EXAMPLES
        )
        if in_gradkit or filename.startswith(_LIBRARY_DIRS) or frame.filename.startswith("<frozen"):
            continue
        code = f": `{frame.line.strip()}`" if frame.line else ""
        return f" (called at {frame.filename}:{frame.lineno}{code})"
    return ""


def _default_float() -> jnp.dtype:
    """float32, or float64 when x64 is enabled (read at call time, so ``enable_x64`` works)."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _check_float_dtype(value: DTypeLike | None, argument: str, layer: str) -> jnp.dtype | None:
    if value is None:
        return None
    dtype = jnp.dtype(value)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{layer}: {argument} must be a floating dtype, got {dtype}")
    return dtype


def _check_activation(activation: Any, argument: str, layer: str) -> None:
    if activation is not None and not isinstance(activation, str) and not callable(activation):
        raise TypeError(
            f"{layer}: {argument} must be a gradkit.activations name, a callable or None, "
            f"got {activation!r} of type {type(activation).__name__}"
        )


def _resolve_activation(activation: Activation, layer: str) -> Callable[[jax.Array], jax.Array]:
    """Turns an activation name into its function, looked up in gradkit.activations on use."""
    if activation is None:
        return lambda z: z
    if not isinstance(activation, str):
        return activation
    from gradkit import activations

    try:
        return activations.get(activation)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{layer}: {error}") from error


def _as_features(value: Any, argument: str, layer: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | jnp.integer):
        raise TypeError(f"{layer}: {argument} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{layer}: {argument} must be at least 1, got {value}")
    return int(value)


def _input_features(input_shape: int | Sequence[int], layer: str) -> int:
    if isinstance(input_shape, int | jnp.integer) and not isinstance(input_shape, bool):
        return _as_features(input_shape, "input_shape", layer)
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise TypeError(
            f"{layer}: input_shape must be an int or a tuple of ints, got {input_shape!r}"
        ) from None
    if not shape:
        raise ValueError(f"{layer}: input_shape must have a features axis, got ()")
    return _as_features(shape[-1], "input_shape[-1] (the number of input features)", layer)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dense:
    r"""A fully connected layer: :math:`y = \sigma(x W + b)`.

    .. math::

       z = x\,W + b, \qquad y = \sigma(z), \qquad
       W \in \mathbb{R}^{\mathrm{in} \times \mathrm{features}},\
       b \in \mathbb{R}^{\mathrm{features}}

    The last axis of ``x`` is features; any leading axes are batch axes, so one example
    ``(in,)`` and a batch ``(batch, in)`` or ``(batch, time, in)`` all work without ``vmap``.
    (Seed 001's Theano layer computes ``W x + b`` with ``W`` of shape ``(out, in)`` and examples
    as columns; ``kernel`` here is that ``W`` transposed.)

    Before the activation, ``apply`` passes :math:`z` through
    ``gradkit._probe.tap(name, z, kind="preactivation", activation=self.activation)`` and
    applies the function ``gradkit._probe.activation(name, ...)`` returns; both are the identity
    (no extra equation) unless gradkit.diagnostics is collecting, which may then substitute the
    activation to measure a surrogate gradient.

    Args:
      features: the number of output features.
      activation: a gradkit.activations name (``"sigmoid"``), any callable, or ``None`` for the
        identity. Names are looked up when the layer is applied.
      w_init: kernel initializer ``(key, shape, dtype) -> array``; default ``glorot_uniform``.
      b_init: bias initializer; default ``zeros``.
      use_bias: whether the layer has a bias.
      dtype: computation dtype; ``None`` promotes the input with the parameters (float32 input
        and float32 params compute in float32; integer input computes in the params' dtype).
      param_dtype: dtype of the parameters ``init`` creates; ``None`` is JAX's default float
        (float32, or float64 with ``jax_enable_x64``).
      name: the layer's name in error messages and diagnostics; default ``"dense"`` (an MLP names
        its layers ``"dense_0"``, ``"dense_1"``, …).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Dense(3, activation=jnp.tanh)
      >>> params = layer.init(jax.random.key(0), (2,))
      >>> {k: v.shape for k, v in params.items()}
      {'kernel': (2, 3), 'bias': (3,)}
      >>> layer.apply(params, jnp.ones((5, 2))).shape
      (5, 3)
    """

    features: int
    _: dataclasses.KW_ONLY
    activation: Activation = None
    w_init: Initializer = glorot_uniform
    b_init: Initializer = zeros
    use_bias: bool = True
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        label = self._label
        _as_features(self.features, "features", label)
        _check_activation(self.activation, "activation", label)
        _check_float_dtype(self.dtype, "dtype", label)
        _check_float_dtype(self.param_dtype, "param_dtype", label)
        for argument in ("w_init", "b_init"):
            if not callable(getattr(self, argument)):
                raise TypeError(
                    f"{label}: {argument} must be an initializer (key, shape, dtype) -> array, "
                    f"got {getattr(self, argument)!r}"
                )

    @property
    def _label(self) -> str:
        return f"Dense layer {self.layer_name!r}"

    @property
    def layer_name(self) -> str:
        """The name used in error messages and by diagnostics' taps."""
        return self.name if self.name is not None else "dense"

    @property
    def layers(self) -> tuple[Dense]:
        """``(self,)``, so code that walks ``model.layers`` treats a Dense like a one-layer MLP."""
        return (self,)

    def output_shape(self, input_shape: int | Sequence[int]) -> tuple[int, ...]:
        """Returns the shape of ``apply``'s output for an input of ``input_shape``.

        An int is the number of input features, as in :meth:`init`: one example in, ``(features,)``
        out.
        """
        _input_features(input_shape, self._label)
        leading = () if isinstance(input_shape, int | jnp.integer) else tuple(input_shape)[:-1]
        return (*leading, self.features)

    def init(self, key: jax.Array, input_shape: int | Sequence[int]) -> dict[str, jax.Array]:
        """Creates the parameters for inputs whose last axis is ``input_shape[-1]``.

        Args:
          key: a PRNG key.
          input_shape: the input's shape (only its last axis, the features, matters) or the
            number of input features as an int.

        Returns:
          ``{"kernel": (in, features), "bias": (features,)}`` (no ``"bias"`` without
          ``use_bias``), in ``param_dtype``.

        Raises:
          ValueError: if the input has no features axis or a non-positive size.
        """
        in_features = _input_features(input_shape, self._label)
        param_dtype = _check_float_dtype(self.param_dtype, "param_dtype", self._label)
        param_dtype = param_dtype if param_dtype is not None else _default_float()
        w_key, b_key = jax.random.split(key)
        kernel_shape = (in_features, self.features)
        params = {"kernel": self._initialize("w_init", w_key, kernel_shape)}
        if self.use_bias:
            params["bias"] = self._initialize("b_init", b_key, (self.features,))
        return {name: jnp.asarray(value, param_dtype) for name, value in params.items()}

    def _initialize(self, argument: str, key: jax.Array, shape: tuple[int, ...]):
        initializer = getattr(self, argument)
        param_dtype = _check_float_dtype(self.param_dtype, "param_dtype", self._label)
        try:
            value = initializer(key, shape, param_dtype if param_dtype else _default_float())
        except (TypeError, ValueError) as error:
            hint = (
                " (an initializer factory such as normal is called first: normal(0.01))"
                if isinstance(error, TypeError) and "positional argument" in str(error)
                else ""
            )
            raise type(error)(
                f"{self._label}: {argument}={initializer!r} failed for the shape {shape}: "
                f"{error}{hint}"
            ) from error
        if callable(value) and not hasattr(value, "shape"):
            name = getattr(initializer, "__name__", repr(initializer))
            raise TypeError(
                f"{self._label}: {argument}={name} returned a function, not an array: it is an "
                f"initializer factory; pass what it returns, e.g. {argument}={name}()"
            )
        if tuple(jnp.shape(value)) != shape:
            raise ValueError(
                f"{self._label}: the initializer {initializer!r} returned shape "
                f"{tuple(jnp.shape(value))}, expected {shape}"
            )
        return value

    def apply(self, params: Mapping[str, ArrayLike], x: ArrayLike) -> jax.Array:
        """Applies the layer to one example ``(in,)`` or a batch ``(..., in)``.

        Args:
          params: the dict ``init`` returned.
          x: ``(..., in)`` input; the last axis is features.

        Returns:
          ``(..., features)`` output, in ``dtype`` (or the promoted dtype of ``x`` and params).

        Raises:
          ValueError: at trace time, if ``x``'s last axis does not match the kernel, or if the
            params do not fit this layer; the message names the layer, both shapes and the line
            of the caller's code.
        """
        label = self._label
        kernel, bias = self._check_params(params)
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != kernel.shape[0]:
            raise ValueError(
                f"{label} expects inputs of shape (..., {kernel.shape[0]}) (its kernel is "
                f"{tuple(kernel.shape)}), but got an input of shape {tuple(x.shape)}"
                f"{_caller_line()}"
            )
        dtype = _check_float_dtype(self.dtype, "dtype", label)
        if dtype is None:
            operands = (x, kernel) if bias is None else (x, kernel, bias)
            dtype = jnp.result_type(*operands)
            if not jnp.issubdtype(dtype, jnp.inexact):
                dtype = _default_float()
        z = jnp.matmul(x.astype(dtype), kernel.astype(dtype))
        if bias is not None:
            z = z + bias.astype(dtype)
        z = _probe.tap(self.layer_name, z, kind="preactivation", activation=self.activation)
        activation = _resolve_activation(self.activation, label)
        if self.activation is not None:
            activation = _probe.activation(self.layer_name, activation)
        return activation(z)

    def _check_params(self, params: Any) -> tuple[jax.Array, jax.Array | None]:
        label = self._label
        if not isinstance(params, Mapping) or "kernel" not in params:
            found = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            keys = "'kernel' and 'bias'" if self.use_bias else "'kernel'"
            raise ValueError(
                f"{label}: params must be the dict init returned, with {keys}; got {found}"
                f"{_caller_line()}"
            )
        kernel = jnp.asarray(params["kernel"])
        if kernel.ndim != 2 or kernel.shape[1] != self.features:
            raise ValueError(
                f"{label}: params['kernel'] must have shape (in, {self.features}), got "
                f"{tuple(kernel.shape)}{_caller_line()}"
            )
        if not self.use_bias:
            if "bias" in params:
                raise ValueError(
                    f"{label}: params hold a 'bias' but the layer has use_bias=False, so it "
                    "would be ignored (params of a layer with a bias? build it with "
                    f"use_bias=True, or drop the entry){_caller_line()}"
                )
            return kernel, None
        if "bias" not in params:
            raise ValueError(f"{label}: params lack 'bias' (use_bias=True){_caller_line()}")
        bias = jnp.asarray(params["bias"])
        if tuple(bias.shape) != (self.features,):
            raise ValueError(
                f"{label}: params['bias'] must have shape ({self.features},), got "
                f"{tuple(bias.shape)}{_caller_line()}"
            )
        return kernel, bias


def _per_layer(value: Any, count: int, argument: str, is_single: Callable[[Any], bool]) -> list:
    if is_single(value):
        return [value] * count
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        expected = (
            "a gradkit.activations name, a callable or None"
            if argument == "activations"
            else "an initializer (key, shape, dtype) -> array"
        )
        raise TypeError(
            f"MLP: {argument} must be {expected}, or a list of them with one per layer "
            f"({count}); got {value!r}"
        )
    values = list(value)
    if len(values) != count:
        raise ValueError(
            f"MLP: {argument} must be one value or one per layer ({count}), got {len(values)}"
        )
    return values


class MLP:
    r"""A stack of :class:`Dense` layers, applied in order.

    .. math::

       h_0 = x, \qquad h_{l+1} = \sigma_l(h_l W_l + b_l), \quad l = 0, \dots, L - 1

    ``layer_sizes`` **includes the input size**, as seed 001 writes it: ``MLP([2, 4, 1], ...)``
    has two Dense layers, 2→4 and 4→1. Its params are ``{"dense_0": {...}, "dense_1": {...}}``
    in layer order; ``layers`` holds the Dense objects (named like their params keys) and
    ``activations`` each layer's activation.

    Args:
      layer_sizes: ``[in, hidden..., out]``; at least two entries.
      activations: one activation per layer (a sequence of ``len(layer_sizes) - 1`` names,
        callables or ``None``), or a single activation used by every hidden layer, in which case
        the output layer uses ``final_activation``.
      final_activation: the output layer's activation when ``activations`` is a single value
        (default ``None``: a linear output, what a loss on logits wants). Ignored, and must be
        left ``None``, when ``activations`` is a sequence.
      w_init: kernel initializer, or one per layer; default ``glorot_uniform``.
      b_init: bias initializer, or one per layer; default ``zeros``.
      use_bias: whether the layers have biases.
      dtype: computation dtype of every layer (see :class:`Dense`).
      param_dtype: parameter dtype of every layer (see :class:`Dense`).

    Raises:
      ValueError: if ``layer_sizes`` has fewer than two entries or per-layer arguments have the
        wrong length.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mlp = MLP([2, 4, 1], ["sigmoid", "sigmoid"], b_init=constant(1.0))
      >>> params = mlp.init(jax.random.key(0))
      >>> {name: p["kernel"].shape for name, p in params.items()}
      {'dense_0': (2, 4), 'dense_1': (4, 1)}
      >>> mlp.apply(params, jnp.zeros((10, 2))).shape
      (10, 1)
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        activations: Activation | Sequence[Activation],
        *,
        final_activation: Activation = None,
        w_init: Initializer | Sequence[Initializer] = glorot_uniform,
        b_init: Initializer | Sequence[Initializer] = zeros,
        use_bias: bool = True,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
    ):
        sizes = list(layer_sizes)
        if len(sizes) < 2:
            raise ValueError(
                f"MLP: layer_sizes must list the input size and at least one layer size, "
                f"e.g. [2, 4, 1]; got {sizes}"
            )
        for index, size in enumerate(sizes):
            _as_features(size, f"layer_sizes[{index}]", "MLP")
        count = len(sizes) - 1
        single = isinstance(activations, str) or callable(activations) or activations is None
        if single:
            if count == 1 and activations is not None and final_activation is None:
                warnings.warn(
                    f"MLP({sizes}, {activations!r}): a single activation applies to the hidden "
                    "layers, and this MLP has none, so its one layer is linear; pass "
                    f"final_activation={activations!r} (or activations=[{activations!r}]) to "
                    "apply it to the output",
                    stacklevel=2,
                )
            acts = [activations] * (count - 1) + [final_activation]
        else:
            if final_activation is not None:
                raise ValueError(
                    "MLP: final_activation applies only when activations is a single value; "
                    "put the output layer's activation last in the activations list"
                )
            acts = _per_layer(activations, count, "activations", lambda v: False)
        for index, act in enumerate(acts):
            _check_activation(act, f"activations[{index}]", "MLP")
        w_inits = _per_layer(w_init, count, "w_init", callable)
        b_inits = _per_layer(b_init, count, "b_init", callable)
        self._layer_sizes = tuple(int(s) for s in sizes)
        self._layers = tuple(
            Dense(
                sizes[index + 1],
                activation=acts[index],
                w_init=w_inits[index],
                b_init=b_inits[index],
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                name=f"dense_{index}",
            )
            for index in range(count)
        )

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """``(in, hidden..., out)``, the input size included."""
        return self._layer_sizes

    @property
    def layers(self) -> tuple[Dense, ...]:
        """The Dense layers in order; ``layers[i].name`` is ``f"dense_{i}"``."""
        return self._layers

    @property
    def activations(self) -> tuple[Activation, ...]:
        """Each layer's activation as given (names stay names)."""
        return tuple(layer.activation for layer in self._layers)

    def __repr__(self) -> str:
        return f"MLP(layer_sizes={list(self.layer_sizes)}, activations={list(self.activations)})"

    def init(
        self, key: jax.Array, input_shape: int | Sequence[int] | None = None
    ) -> dict[str, dict[str, jax.Array]]:
        """Creates every layer's parameters.

        Args:
          key: a PRNG key (split once per layer).
          input_shape: optional input shape; its last axis must equal ``layer_sizes[0]``.

        Returns:
          ``{"dense_0": {"kernel", "bias"}, "dense_1": {...}, ...}`` in layer order.

        Raises:
          ValueError: if ``input_shape[-1]`` is not ``layer_sizes[0]``.
        """
        if input_shape is not None:
            features = _input_features(input_shape, "MLP")
            if features != self.layer_sizes[0]:
                raise ValueError(
                    f"MLP: input_shape {input_shape!r} has {features} features but "
                    f"layer_sizes[0] is {self.layer_sizes[0]}"
                )
        keys = jax.random.split(key, len(self.layers))
        return {
            layer.name: layer.init(layer_key, self.layer_sizes[index])
            for index, (layer, layer_key) in enumerate(zip(self.layers, keys, strict=True))
        }

    def apply(self, params: Mapping[str, Mapping[str, ArrayLike]], x: ArrayLike) -> jax.Array:
        """Applies the layers in order to one example ``(in,)`` or a batch ``(..., in)``.

        Args:
          params: the dict ``init`` returned.
          x: ``(..., layer_sizes[0])`` input.

        Returns:
          ``(..., layer_sizes[-1])`` output.

        Raises:
          ValueError: at trace time, if ``x`` or ``params`` do not fit; the message names the
            layer, the expected and actual shapes and the caller's line.
        """
        if not isinstance(params, Mapping):
            raise ValueError(
                f"MLP: params must be the dict init returned, got {type(params).__name__}"
                f"{_caller_line()}"
            )
        missing = [layer.name for layer in self.layers if layer.name not in params]
        if missing:
            raise ValueError(
                f"MLP: params lack {missing}; they hold {sorted(params)}, this MLP has "
                f"{[layer.name for layer in self.layers]}{_caller_line()}"
            )
        for index, layer in enumerate(self.layers):
            # The params first: a kernel of another model would otherwise be reported as a bad
            # input to the layer before it.
            layer_params = params[layer.name]
            if not isinstance(layer_params, Mapping) or "kernel" not in layer_params:
                continue  # Dense.apply says what is missing
            expected = (self.layer_sizes[index], self.layer_sizes[index + 1])
            found = tuple(jnp.shape(layer_params["kernel"]))
            if found != expected:
                raise ValueError(
                    f"MLP {list(self.layer_sizes)}: params['{layer.name}']['kernel'] has shape "
                    f"{found}, but this MLP's layer '{layer.name}' maps {expected[0]} to "
                    f"{expected[1]} features and needs {expected} (params of another model?)"
                    f"{_caller_line()}"
                )
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.layer_sizes[0]:
            raise ValueError(
                f"MLP {list(self.layer_sizes)}: layer 'dense_0' expects inputs of shape "
                f"(..., {self.layer_sizes[0]}), but got an input of shape {tuple(x.shape)}"
                f"{_caller_line()}"
            )
        for layer in self.layers:
            x = layer.apply(params[layer.name], x)
        return x
