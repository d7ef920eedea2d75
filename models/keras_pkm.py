"""The Keras 3 port of the product-key memory layer.

Differences from the seed's TensorFlow port, all of them deliberate:

* weights are created in ``build`` from the input shape (no ``input_dim`` argument);
* all heads are computed at once (one matmul for the sub-key scores, one ``top_k`` per
  selection stage), so there is no Python loop over heads;
* the product stage ranks only the pairs of sub-keys that can win
  (:func:`pkm_models.selection.product_candidates`: 119 of 32 x 32 at knn 32), which
  selects exactly what ranking all of them does, ties included;
* the weighted sum of value rows is selectable (``method``): ``"einsum"`` and
  ``"reduce_sum"`` gather every selected row first, ``"accumulate"`` adds one weighted
  row per token at a time and never holds the gathered rows, ``"fused"`` gathers and
  sums 8 slots at a time in a block that XLA compiles into one pass over the value rows
  (with the TensorFlow backend it is compiled even inside a plain ``tf.function``; the
  token count is padded to one of a few buckets, :data:`FUSED_BUCKETS`, so XLA compiles
  it once per bucket, and ONNX exporters cannot convert the compiled block: export a
  model with ``"einsum"``, the weights are the same). ``"auto"``, the default, picks
  ``"fused"`` when traced into a graph (``tf.function``, XLA) or when the gathered rows
  would be large, and ``"einsum"`` otherwise (:meth:`ProductKeyMemory.resolved_method`);
* query batchnorm follows PyTorch's ``BatchNorm1d`` exactly (see ``_batchnorm``), which is
  what made the seed's port disagree with the reference.

Options of Meta's memory layers (docs/memory-layers.md), as in the reference and all off by
default:

* ``value_dim``, ``swilu_projection``: ``value_proj(read * silu(swilu_projection(input)))``
  (or ``value_proj(read)`` with an own value dim and no SwiLU), each a kernel and a bias;
* ``gated``: ``sigmoid(gating(input)) * out``;
* ``value_dtype="bfloat16"``: the table is a bfloat16 variable; every method sums
  ``weight x float32(row)`` in float32 slot by slot in order and rounds the sum once to
  bfloat16, as the reference's ``bf16_weighted_sum`` does (:func:`_blockwise_sum`), then
  continues in float32;
* ``share_values``: the layers of a network read one table, one variable held by the first
  layer (:meth:`ProductKeyMemory.share_values_of`, :func:`pkm_layers_of`).

The ``output`` tap stays the weighted sum (..., v_dim); a layer that projects or gates also
returns its final output as ``layer_output`` (..., output_dim).

The layer uses ``keras.ops`` only and runs eagerly, under ``tf.function`` and with
``jit_compile=True``, with dynamic batch and sequence dimensions.
"""

from __future__ import annotations

import bisect
import math

import keras
from keras import ops

from pkm_models.config import LAYER_OUTPUT, ConfigError, PKMConfig, check_stackable
from pkm_models.selection import product_candidates

METHODS = ("auto", "einsum", "reduce_sum", "accumulate", "fused")
# slots gathered and summed together by the "fused" method: 8 measured fastest on CPU
# (docs/performance.md), 1.1x faster than 16 at 512 and 4,096 tokens, level with 4
FUSED_SLOTS = 8
# Token counts the "fused" method pads to, so that XLA compiles its block once per bucket,
# not once per token count: 64, 96, 128, 192, 256, 384, ... (2**k and 3 * 2**(k-1)), at
# most 1.5x the rows and two compilations per doubling. Padded tokens read value row 0
# with weight 0 (one cached row), so they cost arithmetic, not memory traffic.
FUSED_BUCKETS = tuple(sorted({1 << k for k in range(6, 31)} | {3 << k for k in range(5, 30)}))
# "auto" eagerly: "fused" from this many bytes of gathered rows (tokens x heads x knn x v_dim x 4),
# "einsum" below it, where the temporary is small and a compilation would not pay for itself
AUTO_EAGER_FUSED_BYTES = 64 << 20


def fused_bucket(tokens: int) -> int:
    """The token count the "fused" method computes ``tokens`` at: the smallest of
    :data:`FUSED_BUCKETS` that holds them (``tokens`` itself beyond the last)."""
    i = bisect.bisect_left(FUSED_BUCKETS, tokens)
    return FUSED_BUCKETS[i] if i < len(FUSED_BUCKETS) else tokens


def is_bfloat16(values) -> bool:
    """True for a bfloat16 value table (``value_dtype="bfloat16"``)."""
    return keras.backend.standardize_dtype(values.dtype) == "bfloat16"


def _round_to_bfloat16(x):
    """float32 -> the nearest bfloat16 (ties to even), returned as float32."""
    return ops.cast(ops.cast(x, "bfloat16"), "float32")


def _blockwise_sum(values, indices, weights, n: int, slots: int):
    """sum_j weights[b, j] * values[indices[b, j]] over the n slots j, ``slots`` slots at a
    time (unrolled): each block's gather, multiply and sum fuse into one loop under XLA.

    A bfloat16 table is summed as the reference's ``bf16_weighted_sum`` does: each block's
    rows are gathered in bfloat16 and widened to float32, then ``acc = acc + w_j * row_j``
    in float32, one slot at a time in slot order across the blocks, and the sum is rounded
    once to bfloat16 (returned as float32). Under XLA (the "fused" method, and every method
    in a function compiled whole) the CPU backend may contract a product and its sum into
    one fused multiply-add: at most one float32 ulp of the accumulator per slot, which the
    final rounding to bfloat16 hides except next to a rounding boundary."""
    if is_bfloat16(values):
        weights = ops.cast(weights, "float32")
        acc = None
        for start in range(0, n, slots):
            rows = ops.cast(ops.take(values, indices[:, start : start + slots], axis=0), "float32")  # (bs,slots,v_dim)
            for j in range(min(slots, n - start)):  # slot order: one product and one sum at a time
                part = weights[:, start + j, None] * rows[:, j]  # (bs,v_dim)
                acc = part if acc is None else acc + part
        return _round_to_bfloat16(acc)
    output = None
    for start in range(0, n, slots):
        rows = ops.take(values, indices[:, start : start + slots], axis=0)  # (bs,slots,v_dim)
        part = ops.sum(rows * weights[:, start : start + slots, None], axis=1)  # (bs,v_dim)
        output = part if output is None else output + part
    return output


_compiled_blockwise_sum = None


def _in_xla_context() -> bool:
    """True while tracing into a function that XLA compiles whole (``jit_compile=True``)."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return not tf.executing_eagerly() and control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _padded_to_bucket(indices, weights):
    """``indices`` and ``weights`` (bs, n) padded with slot 0 and weight 0 to the bucket of
    bs, and bs itself (a Python int when known at trace time, else a scalar tensor)."""
    import tensorflow as tf

    tokens = indices.shape[0]
    if tokens is not None:
        extra = fused_bucket(tokens) - tokens
    else:  # traced with a dynamic token count: the bucket is chosen at run time
        tokens = tf.shape(indices)[0]
        buckets = tf.constant(FUSED_BUCKETS, tf.int32)
        at = tf.minimum(tf.searchsorted(buckets, tf.reshape(tokens, (1,))), len(FUSED_BUCKETS) - 1)
        extra = tf.maximum(tf.gather(buckets, at)[0] - tokens, 0)
    padding = [[0, extra], [0, 0]]
    return tf.pad(indices, padding), tf.pad(weights, padding), tokens


def _fused_sum(values, indices, weights, n: int, slots: int = FUSED_SLOTS):
    """:func:`_blockwise_sum`, compiled by XLA when the backend is TensorFlow (also inside
    a ``tf.function`` that is not itself compiled), on token counts padded to
    :data:`FUSED_BUCKETS` (except inside a function XLA compiles whole, which compiles per
    shape anyway); other backends' compilers fuse it."""
    global _compiled_blockwise_sum
    if keras.backend.backend() != "tensorflow":
        return _blockwise_sum(values, indices, weights, n, slots)
    import tensorflow as tf

    if _compiled_blockwise_sum is None:
        # one trace per bucket when called eagerly; one XLA compilation per bucket in a graph
        _compiled_blockwise_sum = tf.function(_blockwise_sum, jit_compile=True)
    # a tensor, not the variable: a resource input would not export (tf2onnx)
    values = tf.convert_to_tensor(values)
    if _in_xla_context():
        return _compiled_blockwise_sum(values, indices, weights, n, slots)
    if values.dtype == tf.bfloat16:
        # XLA's CPU backend computes bfloat16 in float32, converting the whole table first
        # (3.17 GiB for mega's): the same sum, uncompiled, gathers the rows it needs
        return _blockwise_sum(values, indices, weights, n, slots)
    indices, weights, tokens = _padded_to_bucket(indices, weights)
    return _compiled_blockwise_sum(values, indices, weights, n, slots)[:tokens]


@keras.saving.register_keras_serializable(package="pkm")
class ProductKeyMemory(keras.layers.Layer):
    """Product-key memory layer (Lample et al. 2019), numerically matching XLM's
    ``HashingMemory``.

    Args:
        output_dim: size of a value row, and of the output's last dimension.
        k_dim: query and key size; each half is matched against its own sub-keys.
        heads: number of memory heads; their reads are summed.
        knn: value rows read per head.
        n_keys: sub-keys per half; the memory holds ``n_keys ** 2`` value rows.
        query_batchnorm: normalise the projected queries like ``torch.nn.BatchNorm1d``.
        input_dropout, query_dropout, value_dropout: dropout rates (training only).
        value_dim, swilu_projection, gated, value_dtype, share_values: Meta's memory-layer
            options (:class:`~pkm_models.config.PKMConfig`, docs/memory-layers.md); a layer
            that projects or gates returns ``value_proj``'s (gated) output and adds the
            ``layer_output`` tap. ``share_values`` records that the layers of a network read
            one table; :meth:`share_values_of` makes a layer read another's.
        method: how the selected value rows are summed: ``"auto"`` (the default: the
            fastest for the call, see :meth:`resolved_method`), ``"einsum"``,
            ``"reduce_sum"``, ``"accumulate"`` (lowest memory) or ``"fused"`` (fastest on
            CPU; token counts padded to :data:`FUSED_BUCKETS`). All give the same result;
            to export to ONNX, build with ``"einsum"``.
        batchnorm_momentum: PyTorch convention: ``running = (1 - m) * running + m * batch``.
        batchnorm_epsilon: added to the variance, as in PyTorch (default ``1e-5``).
        seed: seed of the dropout generator.

    Input shape: ``(..., input_dim)``, at least 1-D; ``input_dim`` is read at build time.

    Output shape: ``(..., output_dim)``; a 1-D input gives ``(1, output_dim)``, as the
    reference does. The ``output`` tap (the weighted sum of value rows) is ``(..., v_dim)``.

    Example:

    >>> layer = ProductKeyMemory(output_dim=8, k_dim=8, heads=2, knn=4, n_keys=8)
    >>> layer(keras.random.normal((3, 5, 16))).shape
    (3, 5, 8)
    """

    def __init__(
        self,
        output_dim: int,
        k_dim: int = 256,
        heads: int = 4,
        knn: int = 32,
        n_keys: int = 512,
        query_batchnorm: bool = False,
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        value_dim: int = 0,
        swilu_projection: bool = False,
        gated: bool = False,
        value_dtype: str = "float32",
        share_values: bool = False,
        method: str = "auto",
        batchnorm_momentum: float = 0.1,
        batchnorm_epsilon: float = 1e-5,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # input_dim is only known in build(); 1 stands in for it while validating the rest
        self.pkm_config = PKMConfig(
            input_dim=1,
            output_dim=output_dim,
            k_dim=k_dim,
            heads=heads,
            knn=knn,
            n_keys=n_keys,
            query_batchnorm=query_batchnorm,
            input_dropout=input_dropout,
            query_dropout=query_dropout,
            value_dropout=value_dropout,
            value_dim=value_dim,
            swilu_projection=swilu_projection,
            gated=gated,
            value_dtype=value_dtype,
            share_values=share_values,
        )
        if method not in METHODS:
            raise ConfigError(f"ProductKeyMemory.method: unknown method {method!r}; available: {list(METHODS)}")
        if not 0.0 <= batchnorm_momentum <= 1.0:
            raise ConfigError(f"ProductKeyMemory.batchnorm_momentum: must be in [0, 1], got {batchnorm_momentum}")
        if not batchnorm_epsilon > 0:
            raise ConfigError(f"ProductKeyMemory.batchnorm_epsilon: must be positive, got {batchnorm_epsilon}")
        self.output_dim = output_dim
        self.k_dim = k_dim
        self.heads = heads
        self.knn = knn
        self.n_keys = n_keys
        self.query_batchnorm = query_batchnorm
        self.input_dropout = input_dropout
        self.query_dropout = query_dropout
        self.value_dropout = value_dropout
        self.value_dim = self.pkm_config.value_dim  # Meta's -1 is 0: the output dim
        self.swilu_projection = swilu_projection
        self.gated = gated
        self.value_dtype = value_dtype
        self.share_values = share_values
        self.method = method
        self.batchnorm_momentum = batchnorm_momentum
        self.batchnorm_epsilon = batchnorm_epsilon
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self._has_dropout else None
        # the layer whose value table this one reads (share_values_of); not tracked as a sublayer
        object.__setattr__(self, "_values_owner", None)

    @classmethod
    def from_pkm_config(cls, config: PKMConfig, **kwargs) -> ProductKeyMemory:
        """A layer with the hyper-parameters of ``config`` (its ``input_dim`` is checked
        at build time)."""
        fields = config.to_dict()
        input_dim = fields.pop("input_dim")
        layer = cls(**fields, **kwargs)
        layer._expected_input_dim = input_dim
        return layer

    @property
    def _has_dropout(self) -> bool:
        return any(p > 0 for p in (self.input_dropout, self.query_dropout, self.value_dropout))

    @property
    def size(self) -> int:
        return self.n_keys**2

    @property
    def v_dim(self) -> int:
        """The size of a value row: ``value_dim`` when set, else ``output_dim``."""
        return self.pkm_config.v_dim

    def share_values_of(self, owner: ProductKeyMemory) -> None:
        """Read ``owner``'s value table instead of a table of its own (Meta's
        ``share_values``): one variable, held once, in both layers' weights. Call before
        this layer is built; ``owner`` must be built first (a ``Sequential`` builds its
        layers in order)."""
        if self.built:
            raise ConfigError(f"ProductKeyMemory {self.name!r}: share_values_of must be called before it is built")
        if not isinstance(owner, ProductKeyMemory) or owner is self:
            raise ConfigError(f"ProductKeyMemory {self.name!r}: can only share the table of another ProductKeyMemory")
        object.__setattr__(self, "_values_owner", owner)

    @property
    def values_owner(self) -> ProductKeyMemory | None:
        """The layer whose value table this one reads, or None (its own)."""
        return self._values_owner

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ConfigError(f"ProductKeyMemory: the last input dimension must be known, got {input_shape}")
        expected = getattr(self, "_expected_input_dim", None)
        if expected is not None and expected != input_dim:
            raise ConfigError(f"ProductKeyMemory: built for input_dim={expected}, got input shape {input_shape}")
        self.input_dim = int(input_dim)
        self.pkm_config = self.pkm_config.replace(input_dim=self.input_dim)  # 1 stood in for it
        hk = self.heads * self.k_dim
        bound = 1.0 / math.sqrt(self.input_dim)
        linear_init = keras.initializers.RandomUniform(-bound, bound)
        self.query_kernel = self.add_weight(name="query_kernel", shape=(self.input_dim, hk), initializer=linear_init)
        self.query_bias = self.add_weight(name="query_bias", shape=(hk,), initializer=linear_init)
        if self.query_batchnorm:
            self.bn_gamma = self.add_weight(name="bn_gamma", shape=(hk,), initializer="ones")
            self.bn_beta = self.add_weight(name="bn_beta", shape=(hk,), initializer="zeros")
            self.bn_moving_mean = self.add_weight(
                name="bn_moving_mean", shape=(hk,), initializer="zeros", trainable=False
            )
            self.bn_moving_variance = self.add_weight(
                name="bn_moving_variance", shape=(hk,), initializer="ones", trainable=False
            )
        half = self.k_dim // 2
        key_bound = 1.0 / math.sqrt(half)
        self.keys = self.add_weight(
            name="keys",
            shape=(self.heads, 2, self.n_keys, half),
            initializer=keras.initializers.RandomUniform(-key_bound, key_bound),
        )
        self._build_values()
        self._build_projection()

    def _build_values(self):
        owner = self._values_owner
        if owner is not None:  # share_values: the owner's variable, tracked here too (one variable)
            if not owner.built:
                raise ConfigError(f"ProductKeyMemory {self.name!r}: {owner.name!r}, whose table it reads, is not built")
            table = owner.values
            expected = ((self.size, self.v_dim), self.value_dtype)
            got = (tuple(table.shape), keras.backend.standardize_dtype(table.dtype))
            if got != expected:
                raise ConfigError(
                    f"ProductKeyMemory {self.name!r}: cannot share {owner.name!r}'s value table {got}, "
                    f"expected {expected}"
                )
            self.values = table
            return
        # drawn in TensorFlow, the normal values take several temporaries of the table's
        # size: a layer whose weights are loaded next starts from zeros instead, on
        # untouched pages where it can (_untouched_zeros), since the loaded table replaces them
        values_init = _untouched_zeros if _LOADING else keras.initializers.RandomNormal(stddev=self.v_dim**-0.5)
        bf16 = self.value_dtype == "bfloat16"
        self.values = self.add_weight(
            name="values",
            shape=(self.size, self.v_dim),
            initializer=values_init,
            # a bfloat16 table is stored as such and never cast by a dtype policy
            dtype="bfloat16" if bf16 else None,
            autocast=not bf16,
        )

    def _build_projection(self):
        """Meta's read projection and gate (kernels (in, out), as the query's)."""

        def linear(name, fan_in, fan_out, std):
            bound = 1.0 / math.sqrt(fan_in)
            kernel = self.add_weight(
                name=f"{name}_kernel", shape=(fan_in, fan_out), initializer=keras.initializers.RandomNormal(stddev=std)
            )
            bias = self.add_weight(
                name=f"{name}_bias", shape=(fan_out,), initializer=keras.initializers.RandomUniform(-bound, bound)
            )
            return kernel, bias

        if self.pkm_config.projects_value:
            self.value_proj_kernel, self.value_proj_bias = linear(
                "value_proj", self.v_dim, self.output_dim, self.output_dim**-0.5
            )
        if self.swilu_projection:
            self.swilu_projection_kernel, self.swilu_projection_bias = linear(
                "swilu_projection", self.input_dim, self.v_dim, self.output_dim**-0.5
            )
        if self.gated:
            self.gating_kernel, self.gating_bias = linear("gating", self.input_dim, 1, self.input_dim**-0.5)

    # stages -----------------------------------------------------------------------------
    def _dropout(self, x, rate, training):
        if training and rate > 0:
            return keras.random.dropout(x, rate, seed=self.seed_generator)
        return x

    def _batchnorm(self, q, training):
        """``torch.nn.BatchNorm1d`` semantics on (bs, features).

        Training: normalise with the batch mean and the *biased* batch variance, and
        update the running variance with the *unbiased* one (Bessel's n / (n - 1));
        running = (1 - momentum) * running + momentum * batch. Inference: the running
        statistics. Keras' own ``BatchNormalization`` differs on three counts: its momentum
        weighs the old value (0.99 ~ PyTorch's 0.01), its epsilon defaults to 1e-3, and it
        updates the moving variance with the biased batch variance.
        """
        eps = self.batchnorm_epsilon
        if training:
            mean = ops.mean(q, axis=0)  # (features,)
            var = ops.mean(ops.square(q - mean), axis=0)  # biased, (features,)
            n = ops.cast(ops.shape(q)[0], q.dtype)
            unbiased = var * n / ops.maximum(n - 1.0, 1.0)
            m = self.batchnorm_momentum
            self.bn_moving_mean.assign((1.0 - m) * self.bn_moving_mean + m * mean)
            self.bn_moving_variance.assign((1.0 - m) * self.bn_moving_variance + m * unbiased)
        else:
            mean, var = self.bn_moving_mean, self.bn_moving_variance
        return (q - mean) * ops.rsqrt(var + eps) * self.bn_gamma + self.bn_beta

    def _select(self, query):
        """Product-key top-k for all heads at once.

        query: (bs, heads, k_dim) -> scores (bs, heads, knn) float, indices (bs, heads, knn) int32.
        """
        knn, half, heads = self.knn, self.k_dim // 2, self.heads
        # every head's and half's sub-key scores in one batched matmul, heads first
        q = ops.transpose(ops.reshape(query, (-1, heads * 2, half)), (1, 0, 2))  # (heads*2,bs,half)
        keys = ops.reshape(self.keys, (heads * 2, self.n_keys, half))  # (heads*2,n_keys,half)
        sub_scores = ops.matmul(q, ops.transpose(keys, (0, 2, 1)))  # (heads*2,bs,n_keys)
        # top_k on 2-D tensors: XLA's CPU backend sorts whole rows for higher ranks (5x slower)
        sub_s, sub_i = ops.top_k(ops.reshape(sub_scores, (-1, self.n_keys)), knn)  # (heads*2*bs,knn)
        sub_s = ops.transpose(ops.reshape(sub_s, (heads, 2, -1, knn)), (2, 0, 1, 3))  # (bs,heads,2,knn)
        sub_i = ops.transpose(ops.reshape(sub_i, (heads, 2, -1, knn)), (2, 0, 1, 3))  # (bs,heads,2,knn)
        s1, s2 = sub_s[:, :, 0], sub_s[:, :, 1]  # (bs,heads,knn)
        i1, i2 = sub_i[:, :, 0], sub_i[:, :, 1]  # (bs,heads,knn)
        # the pairs of each half's best candidates that can be among the knn best of their
        # product, in the product's flattened order (exactly the same selection, ties included)
        first, second = product_candidates(knn)  # (pairs,) ranks into each half's knn
        all_scores = ops.take(s1, first, axis=-1) + ops.take(s2, second, axis=-1)  # (bs,heads,pairs)
        all_indices = ops.take(i1, first, axis=-1) * self.n_keys + ops.take(i2, second, axis=-1)
        all_scores = ops.reshape(all_scores, (-1, len(first)))  # (bs*heads,pairs)
        all_indices = ops.reshape(all_indices, (-1, len(first)))  # (bs*heads,pairs)
        scores, best = ops.top_k(all_scores, knn)  # (bs*heads,knn)
        indices = ops.take_along_axis(all_indices, best, axis=-1)  # (bs*heads,knn)
        return ops.reshape(scores, (-1, heads, knn)), ops.reshape(indices, (-1, heads, knn))

    def resolved_method(self, tokens: int | None) -> str:
        """The method a call on ``tokens`` tokens (None: unknown) uses here and now.

        ``"auto"`` with the TensorFlow backend is ``"fused"`` while tracing into a graph
        (``tf.function``, XLA: compiled once per token bucket, then 1.4-2.5x faster than
        ``"einsum"`` on CPU, docs/equivalence.md) and, eagerly, when the gathered rows
        would take at least :data:`AUTO_EAGER_FUSED_BYTES`; otherwise, and with other
        backends, ``"einsum"``. Any other method is itself."""
        if self.method != "auto":
            return self.method
        if keras.backend.backend() != "tensorflow":
            return "einsum"
        import tensorflow as tf

        if not tf.executing_eagerly():
            return "fused"
        gathered = (tokens or 0) * self.heads * self.knn * self.v_dim * 4
        return "fused" if gathered >= AUTO_EAGER_FUSED_BYTES else "einsum"

    def _weighted_sum(self, indices, weights):
        """sum_j weights[b, j] * values[indices[b, j]]: (bs, n) x (bs, n) -> (bs, v_dim).

        A bfloat16 table is summed in slot order in float32 and rounded once to bfloat16 by
        every method (the gathering ones gather every slot, then add in order)."""
        method = self.resolved_method(indices.shape[0])
        n = self.heads * self.knn
        bf16 = self.value_dtype == "bfloat16"
        if method == "accumulate":

            def body(j, acc):
                row = ops.take(self.values, ops.take(indices, j, axis=1), axis=0)  # (bs,v_dim)
                if bf16:
                    row = ops.cast(row, "float32")
                return acc + ops.cast(ops.take(weights, j, axis=1), acc.dtype)[:, None] * row

            dtype = "float32" if bf16 else self.values.dtype
            zeros = ops.zeros((ops.shape(indices)[0], self.v_dim), dtype=dtype)
            output = ops.fori_loop(0, n, body, zeros)
            return _round_to_bfloat16(output) if bf16 else output
        if method == "fused":
            return _fused_sum(self.values, indices, weights, n)
        if bf16:  # einsum and reduce_sum: every slot gathered at once, then summed in slot order
            return _blockwise_sum(self.values, indices, weights, n, n)
        rows = ops.take(self.values, indices, axis=0)  # (bs,heads*knn,v_dim)
        if method == "einsum":
            return ops.einsum("bn,bnd->bd", weights, rows)
        return ops.sum(rows * weights[..., None], axis=1)  # reduce_sum

    def _project(self, x, read, training):
        """Meta's read projection and gate on (bs,input_dim) ``x`` and the (bs,v_dim) read:
        ``value_proj(read * silu(swilu_projection(x)))`` (or ``value_proj(read)``), value
        dropout, then ``sigmoid(gating(x)) *``, as the reference's ``project``."""
        out = read
        if self.swilu_projection:
            out = out * ops.silu(ops.matmul(x, self.swilu_projection_kernel) + self.swilu_projection_bias)
        if self.pkm_config.projects_value:
            out = ops.matmul(out, self.value_proj_kernel) + self.value_proj_bias  # (bs,output_dim)
        out = self._dropout(out, self.value_dropout, training)
        if self.gated:
            out = ops.sigmoid(ops.matmul(x, self.gating_kernel) + self.gating_bias) * out  # (bs,output_dim)
        return out

    def call(self, inputs, training=None, return_taps=False):
        x = ops.convert_to_tensor(inputs)
        prefix = ops.shape(x)[:-1]

        # query: (bs,heads*k_dim), batchnorm over all tokens
        x = self._dropout(ops.reshape(x, (-1, self.input_dim)), self.input_dropout, training)  # (bs,i_dim)
        query = ops.matmul(x, self.query_kernel) + self.query_bias  # (bs,heads*k_dim)
        if self.query_batchnorm:
            query = self._batchnorm(query, training)
        query = self._dropout(query, self.query_dropout, training)
        query = ops.reshape(query, (-1, self.heads, self.k_dim))  # (bs,heads,k_dim)

        # selection and softmax weights
        scores, indices = self._select(query)  # (bs,heads,knn)
        weights = ops.softmax(scores, axis=-1)  # (bs,heads,knn)

        # weighted sum of value rows over heads and knn
        n = self.heads * self.knn
        output = self._weighted_sum(ops.reshape(indices, (-1, n)), ops.reshape(weights, (-1, n)))  # (bs,v_dim)
        projects = self.pkm_config.projects_output
        if not projects:  # Meta's layer drops out after value_proj (in _project)
            output = self._dropout(output, self.value_dropout, training)

        # Meta's projection and gate: the layer's output is then not the weighted sum
        final = self._project(x, output, training) if projects else None  # (bs,output_dim)
        if len(prefix) >= 2:
            output = ops.reshape(output, (*prefix, self.v_dim))  # (...,v_dim)
            if projects:
                final = ops.reshape(final, (*prefix, self.output_dim))  # (...,output_dim)

        if not return_taps:
            return final if projects else output
        taps = {
            "query": ops.reshape(query, (-1, self.k_dim)),
            "scores": ops.reshape(scores, (-1, self.knn)),
            "indices": ops.cast(ops.reshape(indices, (-1, self.knn)), "int64"),
            "weights": ops.reshape(weights, (-1, self.knn)),
            "output": output,
        }
        if projects:
            taps[LAYER_OUTPUT] = final
        return taps

    def get_config(self):
        return {
            **super().get_config(),
            "output_dim": self.output_dim,
            "k_dim": self.k_dim,
            "heads": self.heads,
            "knn": self.knn,
            "n_keys": self.n_keys,
            "query_batchnorm": self.query_batchnorm,
            "input_dropout": self.input_dropout,
            "query_dropout": self.query_dropout,
            "value_dropout": self.value_dropout,
            # Meta's options only where set: an XLM layer's config is what it was
            **{k: v for k, v in self.pkm_config.to_dict().items() if k in self.pkm_config.variant},
            "method": self.method,
            "batchnorm_momentum": self.batchnorm_momentum,
            "batchnorm_epsilon": self.batchnorm_epsilon,
            "seed": self.seed,
        }


_LOADING = False  # layers built now get their weights loaded next (see build_keras_model)


def _untouched_zeros(shape, dtype=None):
    """Zeros for a variable whose value is assigned next: with the TensorFlow backend, a
    tensor over untouched zero pages (no memory until written), which the variable adopts
    and gives up when its value is assigned (:func:`pkm_models.convert.assign_variable`);
    ``tf.zeros`` would write the whole table first (3 GB for a 1M-row table). Other
    backends: ``ops.zeros``."""
    dtype = keras.backend.standardize_dtype(dtype)
    if keras.backend.backend() != "tensorflow":
        return ops.zeros(shape, dtype)
    import tensorflow as tf

    from pkm_models.convert import aligned_empty, tensor_adopting

    return tensor_adopting(aligned_empty(tuple(shape), tf.as_dtype(dtype).as_numpy_dtype, zeros=True))


def build_keras_model(
    config: PKMConfig,
    layers: int = 1,
    seed: int | None = 0,
    method: str = "auto",
    input_rank: int = 3,
    dtype: str | None = None,
    weights=None,
    structure_only: bool = False,
) -> keras.Sequential:
    """A built ``Sequential`` of ``layers`` ProductKeyMemory layers taking
    ``(batch, ..., input_dim)`` inputs of rank ``input_rank`` with dynamic leading
    dimensions, loaded with the deterministic weights of ``(config, seed)`` unless
    ``seed`` is None, or with ``weights`` (torch-named numpy arrays) when given: then the
    value tables are built as zeros and filled in blocks, never drawn at random first.
    ``dtype``: the layers' Keras dtype policy (e.g. ``"float16"``: variables and
    computation in that type); default float32. ``structure_only``: a model whose weights
    will not be used (an exporter traces it with its weights as inputs): with ``seed`` None,
    its value tables are untouched zeros instead of drawn (no memory for a 3 GB table)."""
    from pkm_models.convert import set_keras_weights
    from pkm_models.weights import make_weights

    if input_rank < 2:
        raise ConfigError(f"input_rank must be >= 2 for a Keras model, got {input_rank}")
    check_stackable(config, layers, "build_keras_model")
    global _LOADING
    _LOADING = weights is not None or seed is not None or structure_only
    try:
        model = _sequential(config, layers, method, input_rank, dtype)
    finally:
        _LOADING = False
    if weights is not None:
        set_keras_weights(model, weights)
    elif seed is not None:
        set_keras_weights(model, make_weights(config, seed, layers=layers))
    return model


def pkm_layers_of(config: PKMConfig, layers: int = 1, **kwargs) -> list[ProductKeyMemory]:
    """``layers`` unbuilt ProductKeyMemory layers of ``config`` named ``pkm_<i>`` (``kwargs``
    go to each), to be applied in order; with ``config.share_values`` every layer after the
    first reads the first one's value table (:meth:`ProductKeyMemory.share_values_of`)."""
    out = [ProductKeyMemory.from_pkm_config(config, name=f"pkm_{i}", **kwargs) for i in range(layers)]
    if config.share_values:
        for layer in out[1:]:
            layer.share_values_of(out[0])
    return out


def _sequential(config: PKMConfig, layers: int, method: str, input_rank: int, dtype: str | None) -> keras.Sequential:
    return keras.Sequential(
        [
            keras.Input(shape=(None,) * (input_rank - 2) + (config.input_dim,)),
            *pkm_layers_of(config, layers, method=method, dtype=dtype),
        ],
        name="pkm" if layers == 1 else f"pkm_stack_{layers}",
    )
