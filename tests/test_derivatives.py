"""Tests for gradkit.derivatives: seed 003's numbers, references on random pytrees, errors."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from jax.flatten_util import ravel_pytree

import gradkit.derivatives as derivatives
from gradkit.derivatives import Lop, Rop, hessian, hvp, jacobian, jvp, vjp

# --------------------------------------------------------------------------------------------
# Seed 003: the numbers the Theano post printed


def test_seed_jacobian_of_square_at_4_4():
    x = jnp.array([4.0, 4.0])
    for mode in ("auto", "forward", "reverse"):
        np.testing.assert_array_equal(
            jacobian(lambda x: x**2, mode=mode)(x), [[8.0, 0.0], [0.0, 8.0]]
        )


def test_seed_jacobian_of_scalar_wrt_two_arguments_is_the_gradient():
    def s(x, y):
        return jnp.sum(x**2 + y**2)

    jx, jy = jacobian(s, argnums=(0, 1))(jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0]))
    np.testing.assert_array_equal(jx, [2.0, 4.0])
    np.testing.assert_array_equal(jy, [2.0, 4.0])


def test_seed_hessians():
    np.testing.assert_array_equal(
        hessian(lambda x: jnp.sum(x**2))(jnp.array([4.0, 4.0])), [[2.0, 0.0], [0.0, 2.0]]
    )

    def s(x, y):
        return jnp.sum(x**2 + y**2)

    h = hessian(s, argnums=(0, 1))(jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0]))
    np.testing.assert_array_equal(h[0][0], 2 * np.eye(2))
    np.testing.assert_array_equal(h[1][1], 2 * np.eye(2))
    np.testing.assert_array_equal(h[0][1], np.zeros((2, 2)))
    np.testing.assert_array_equal(h[1][0], np.zeros((2, 2)))


def test_seed_rop_and_lop_of_x_dot_w():
    W, V = jnp.ones((2, 2)), jnp.full((2, 2), 2.0)
    x = jnp.array([0.0, 1.0])
    np.testing.assert_array_equal(Rop(lambda x, W: x @ W, (x, W), V, argnums=1), [2.0, 2.0])
    np.testing.assert_array_equal(Rop(lambda W: x @ W, W, V), [2.0, 2.0])
    u = jnp.array([2.0, 2.0])
    np.testing.assert_array_equal(
        Lop(lambda x, W: x @ W, (x, W), u, argnums=1), [[0.0, 0.0], [2.0, 2.0]]
    )
    np.testing.assert_array_equal(Lop(lambda W: x @ W, W, u), [[0.0, 0.0], [2.0, 2.0]])


def test_seed_hessian_vector_product_three_ways():
    def f(x):
        return jnp.sum(x**2)

    x, v = jnp.array([4.0, 4.0]), jnp.array([2.0, 2.0])
    method_one = jax.grad(lambda x: jnp.sum(jax.grad(f)(x) * v))(x)
    method_two = Rop(jax.grad(f), x, v)
    for value in (hvp(f, x, v), method_one, method_two):
        np.testing.assert_array_equal(value, [4.0, 4.0])


def test_aliases_are_the_same_objects():
    assert Rop is jvp
    assert Lop is vjp


def test_docstring_examples_run():
    result = doctest.testmod(derivatives, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 20
    assert result.failed == 0


# --------------------------------------------------------------------------------------------
# References on random pytrees, in float64


def _random_tree(rng: np.random.Generator) -> dict:
    shapes = [tuple(rng.integers(1, 4, size=rng.integers(0, 3))) for _ in range(3)]
    return {
        f"leaf{i}": jnp.asarray(rng.normal(size=shape), dtype=jnp.float64)
        for i, shape in enumerate(shapes)
    }


def _scalar_function(tree: dict) -> jax.Array:
    total = 0.0
    for i, leaf in enumerate(tree.values()):
        total = total + jnp.sum(jnp.sin(leaf) * leaf ** (i + 2)) + jnp.sum(leaf) ** 2 / (i + 1)
    return total


def _vector_function(tree: dict) -> dict:
    flat = jnp.concatenate([jnp.ravel(leaf) for leaf in tree.values()])
    return {"a": jnp.tanh(flat) * flat[0], "b": jnp.exp(flat[:2]).sum() * flat[-1:]}


def _jacobians(tree):
    """gradkit's Jacobian in each mode next to jax.jacrev's and jax.jacfwd's."""
    modes = ("auto", "forward", "reverse")
    ours = {mode: jacobian(_vector_function, mode=mode)(tree) for mode in modes}
    return ours, jax.jacrev(_vector_function)(tree), jax.jacfwd(_vector_function)(tree)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_matches_jacfwd_and_jacrev_on_random_pytrees(seed):
    rng = np.random.default_rng(seed)
    with enable_x64():
        tree = _random_tree(rng)
        ours, expected, forward = jax.jit(_jacobians)(tree)  # one compilation per seed
        for mode, got in ours.items():
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
            for a, b in zip(
                jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected), strict=True
            ):
                assert a.dtype == jnp.float64, mode
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        for a, b in zip(
            jax.tree_util.tree_leaves(forward), jax.tree_util.tree_leaves(expected), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def _products_and_references(tree, v, u):
    """gradkit's hessian, hvp, jvp and vjp, and dense and finite-difference references."""
    flat, unravel = ravel_pytree(tree)
    flat_v = ravel_pytree(v)[0]

    def scalar_flat(z):
        return _scalar_function(unravel(z))

    def vector_flat(z):
        return ravel_pytree(_vector_function(unravel(z)))[0]

    grad_flat = jax.grad(scalar_flat)
    eps = 1e-6
    return {
        "blocks": hessian(_scalar_function)(tree),
        "dense": jax.hessian(scalar_flat)(flat),
        "hvp": hvp(_scalar_function, tree, v),
        "hvp_fd": (grad_flat(flat + eps * flat_v) - grad_flat(flat - eps * flat_v)) / (2 * eps),
        "dense_jac": jax.jacfwd(vector_flat)(flat),
        "jvp": jvp(_vector_function, tree, v),
        "jvp_fd": (vector_flat(flat + eps * flat_v) - vector_flat(flat - eps * flat_v)) / (2 * eps),
        "vjp": vjp(_vector_function, tree, u),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hessian_hvp_jvp_vjp_match_dense_references_on_random_pytrees(seed):
    rng = np.random.default_rng(seed)
    with enable_x64():
        tree = _random_tree(rng)
        v = {k: jnp.asarray(rng.normal(size=leaf.shape)) for k, leaf in tree.items()}
        out = jax.eval_shape(_vector_function, tree)
        u = jax.tree_util.tree_map(lambda o: jnp.asarray(rng.normal(size=o.shape)), out)
        got = jax.jit(_products_and_references)(tree, v, u)  # one compilation per seed
        flat_v, flat_u = ravel_pytree(v)[0], ravel_pytree(u)[0]
        dense, dense_jac = got["dense"], got["dense_jac"]

        # hessian: reassemble the nested blocks into a dense matrix.
        blocks = got["blocks"]
        keys = list(tree)
        rows = [
            jnp.concatenate(
                [blocks[r][c].reshape(tree[r].size, tree[c].size) for c in keys], axis=1
            )
            for r in keys
        ]
        np.testing.assert_allclose(jnp.concatenate(rows, axis=0), dense, rtol=1e-10, atol=1e-10)

        # hvp against the dense product and against central differences of the gradient.
        assert jax.tree_util.tree_structure(got["hvp"]) == jax.tree_util.tree_structure(tree)
        product = ravel_pytree(got["hvp"])[0]
        np.testing.assert_allclose(product, dense @ flat_v, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(product, got["hvp_fd"], rtol=1e-6, atol=1e-6)

        # jvp and vjp against the dense Jacobian of the flattened vector function.
        tangent = ravel_pytree(got["jvp"])[0]
        np.testing.assert_allclose(tangent, dense_jac @ flat_v, rtol=1e-10)
        np.testing.assert_allclose(tangent, got["jvp_fd"], rtol=1e-6, atol=1e-6)
        assert jax.tree_util.tree_structure(got["vjp"]) == jax.tree_util.tree_structure(tree)
        np.testing.assert_allclose(ravel_pytree(got["vjp"])[0], flat_u @ dense_jac, rtol=1e-10)


def test_multi_argument_products_with_tuple_argnums():
    with enable_x64():

        def f(a, b, c):
            return jnp.sum(jnp.sin(a) * b**2) + c * jnp.sum(a * b)

        a, b, c = jnp.array([0.1, 0.2, 0.3]), jnp.array([1.0, -2.0, 0.5]), 3.0
        va, vb = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.5, 1.5, -1.0])

        def flat(z):
            return f(z[:3], z[3:], c)

        dense = jax.hessian(flat)(jnp.concatenate([a, b]))
        got = hvp(f, (a, b, c), (va, vb), argnums=(0, 1))
        np.testing.assert_allclose(jnp.concatenate(got), dense @ jnp.concatenate([va, vb]))
        # jvp with one selected argument equals the directional derivative in that argument.
        np.testing.assert_allclose(
            jvp(f, (a, b, c), vb, argnums=1), jax.grad(f, argnums=1)(a, b, c) @ vb
        )
        np.testing.assert_allclose(vjp(f, (a, b, c), 2.0, argnums=(0, 2))[1], 2.0 * jnp.sum(a * b))


def test_helpers_work_under_jit_and_vmap():
    def f(x):
        return jnp.sin(x) * x**2

    x = jnp.array([0.3, -0.4, 1.2])
    dense = jax.jacrev(f)(x)
    np.testing.assert_allclose(jax.jit(jacobian(f))(x), dense, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(hessian(lambda x: jnp.sum(f(x))))(x),
        jax.hessian(lambda x: jnp.sum(f(x)))(x),
        rtol=1e-6,
    )
    vs = jnp.eye(3)
    batched = jax.jit(jax.vmap(lambda v: Rop(f, x, v)))(vs)
    np.testing.assert_allclose(batched.T, dense, rtol=1e-6)
    rows = jax.jit(jax.vmap(lambda u: Lop(f, x, u)))(vs)
    np.testing.assert_allclose(rows, dense, rtol=1e-6)
    hv = jax.jit(lambda x, v: hvp(lambda y: jnp.sum(f(y)), x, v))(x, x)
    np.testing.assert_allclose(hv, jax.hessian(lambda y: jnp.sum(f(y)))(x) @ x, rtol=1e-6)


def test_helpers_work_inside_jax_grad():
    # Differentiating through each helper gives the next derivative, checked against formulas.
    x = jnp.array([0.5, -1.0, 2.0])
    v = jnp.array([1.0, 2.0, -0.5])

    def quartic(x):
        return jnp.sum(x**4)

    def through_helpers(x):
        return (
            jnp.sum(hvp(quartic, x, v) * v),  # sum 12 x^2 v^2
            jnp.sum(jacobian(jnp.sin)(x)),  # sum cos x
            jnp.sum(hessian(quartic)(x)),  # sum 12 x^2
            jnp.sum(jvp(jnp.sin, x, v)),  # sum v cos x
            jnp.sum(vjp(jnp.sin, x, v)),  # sum v cos x
        )

    grads = jax.jit(jax.jacrev(through_helpers))(x)
    expected = (24 * x * v**2, -jnp.sin(x), 24 * x, -v * jnp.sin(x), -v * jnp.sin(x))
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_jacobian_has_aux_and_float32_dtype():
    def f(x):
        return (x**3, {"norm": jnp.sum(x**2)})

    x = jnp.array([1.0, 2.0], dtype=jnp.float32)
    jac, aux = jacobian(f, has_aux=True)(x)
    assert jac.dtype == jnp.float32
    np.testing.assert_allclose(jac, np.diag([3.0, 12.0]))
    np.testing.assert_allclose(aux["norm"], 5.0)
    h, aux = hessian(lambda x: (jnp.sum(x**3), 7.0), has_aux=True)(x)
    np.testing.assert_allclose(h, np.diag([6.0, 12.0]))
    assert aux == 7.0


def _all_avals(closed_jaxpr):
    stack = [closed_jaxpr.jaxpr]
    while stack:
        jaxpr = stack.pop()
        for eqn in jaxpr.eqns:
            yield from (v.aval for v in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        stack.append(inner)


def test_hvp_never_builds_the_hessian():
    n = 100_000

    def f(x):
        return jnp.sum(jnp.sin(x) * x)

    x = jnp.linspace(-1.0, 1.0, n)
    v = jnp.cos(x)
    closed = jax.make_jaxpr(lambda x, v: hvp(f, x, v))(x, v)
    assert max(int(np.prod(aval.shape)) for aval in _all_avals(closed)) <= n
    # d²/dx² (x sin x) = 2 cos x - x sin x: the Hessian is diagonal.
    expected = (2 * jnp.cos(x) - x * jnp.sin(x)) * v
    np.testing.assert_allclose(jax.jit(lambda x, v: hvp(f, x, v))(x, v), expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Mode selection


def test_choose_mode_rule():
    assert derivatives._choose_mode(2, 10) == "forward"
    assert derivatives._choose_mode(10, 2) == "reverse"
    assert derivatives._choose_mode(5, 5) == "reverse"


@pytest.mark.parametrize(
    ("n_in", "n_out", "mode", "expected"),
    [
        (2, 6, "auto", "jacfwd"),
        (6, 2, "auto", "jacrev"),
        (3, 3, "auto", "jacrev"),
        (2, 6, "reverse", "jacrev"),
        (6, 2, "forward", "jacfwd"),
    ],
)
def test_jacobian_mode_selection(monkeypatch, n_in, n_out, mode, expected):
    calls = []
    for name in ("jacfwd", "jacrev"):
        original = getattr(jax, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(jax, name, spy)
    W = jnp.ones((n_out, n_in))
    result = jacobian(lambda x: W @ jnp.sin(x), mode=mode)(jnp.zeros(n_in))
    assert calls == [expected]
    np.testing.assert_allclose(result, W)


def test_bad_mode_lists_the_choices():
    with pytest.raises(
        ValueError, match="mode must be one of 'auto', 'forward', 'reverse'; got 'fwd'"
    ):
        jacobian(jnp.sin, mode="fwd")


# --------------------------------------------------------------------------------------------
# Bad input


def test_integer_argument_raises_type_error_naming_path_and_dtype():
    with pytest.raises(TypeError, match=r"but n \(argument 1 of f\) has dtype int32"):
        jacobian(lambda x, n: x * n, argnums=(0, 1))(1.0, 2)
    with pytest.raises(TypeError, match=r"x\['steps'\] has dtype int32"):
        jvp(
            lambda p: p["w"] * p["steps"],
            {"w": 1.0, "steps": jnp.arange(2)},
            {"w": 1.0, "steps": 1.0},
        )
    with pytest.raises(TypeError, match=r"x\['mask'\] \(argument 0 of f\) has dtype bool"):
        hessian(lambda x: jnp.sum(x["w"]))({"w": jnp.ones(2), "mask": jnp.array([True, False])})
    with pytest.raises(TypeError, match=r"hvp: .*x has dtype int32"):
        hvp(lambda x: jnp.sum(x**2), jnp.arange(3), jnp.arange(3))


def test_integer_arguments_outside_argnums_are_fine():
    def f(x, n):
        return x**n

    np.testing.assert_allclose(jacobian(f)(jnp.array([2.0, 3.0]), 2), np.diag([4.0, 6.0]))


def test_hvp_vector_with_other_structure_shows_both_structures():
    x = {"a": jnp.ones(3), "b": jnp.ones(2)}

    def f(p):
        return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"])

    with pytest.raises(ValueError, match="same pytree structure") as info:
        hvp(f, x, {"a": jnp.ones(3)})
    message = str(info.value)
    assert "x: {'a': float32[3], 'b': float32[2]}" in message
    assert "v: {'a': float32[3]}" in message


def test_hvp_vector_with_other_leaf_shapes_and_dtypes():
    x = {"a": jnp.ones(3), "b": jnp.ones(2)}

    def f(p):
        return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"])

    bad = {"a": jnp.ones(4), "b": jnp.ones(2, dtype=jnp.int32)}
    with pytest.raises(
        ValueError, match=r"at \['a'\]: x has float32\[3\], v has float32\[4\]"
    ) as info:
        hvp(f, x, bad)
    assert r"at ['b']: x has float32[2], v has int32[2]" in str(info.value)
    assert "v: {'a': float32[4], 'b': int32[2]}" in str(info.value)


def test_python_scalar_tangent_is_cast_to_the_leaf_dtype():
    assert hvp(lambda x: x**3, jnp.float32(1.0), 2).dtype == jnp.float32
    np.testing.assert_allclose(hvp(lambda x: x**3, jnp.float32(1.0), 2), 12.0)


def test_lop_cotangent_must_match_the_output():
    with pytest.raises(
        ValueError, match=r"u must match f\(x\).*f\(x\) has float32\[3\], u has float32\[2\]"
    ):
        vjp(lambda x: x**2, jnp.ones(3), jnp.ones(2))
    with pytest.raises(ValueError, match="same pytree structure as f"):
        Lop(lambda x: (x, x), jnp.ones(3), jnp.ones(3))


def test_hvp_needs_a_scalar_function():
    with pytest.raises(ValueError, match=r"hvp: f must return a real scalar.*float32\[3\]"):
        hvp(lambda x: x**2, jnp.ones(3), jnp.ones(3))


def test_argnums_errors():
    def f(x, W):
        return x @ W

    x, W = jnp.ones(2), jnp.ones((2, 2))
    with pytest.raises(ValueError, match="argnums=3 names argument 3, but f was called with 2"):
        Rop(f, (x, W), W, argnums=3)
    with pytest.raises(TypeError, match="x must be the tuple of all of f's positional arguments"):
        Rop(f, W, W, argnums=1)
    with pytest.raises(TypeError, match="argnums must be an int or a tuple of ints"):
        jacobian(f, argnums="W")
    with pytest.raises(ValueError, match="must not repeat"):
        hessian(f, argnums=(1, 1))
    with pytest.raises(ValueError, match="argnums=2 names argument 2"):
        jacobian(f, argnums=2)(x, W)


def test_an_argument_named_twice_by_a_negative_position_is_refused():
    def f(a, b):
        return a * b

    point = (jnp.float32(2.0), jnp.float32(3.0))
    for call in (
        lambda: vjp(f, point, 1.0, argnums=(1, -1)),
        lambda: jvp(f, point, (1.0, 0.0), argnums=(-1, 1)),
        lambda: jacobian(f, argnums=(1, -1))(*point),
        lambda: hessian(f, argnums=(0, -2))(*point),
    ):
        with pytest.raises(
            ValueError, match=r"must not repeat an argument, got \((1, -1|-1, 1|0, -2)\)"
        ):
            call()


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_jacobian_takes_non_array_arguments_and_aux_in_every_mode(mode):
    # Only the differentiated argument is abstracted; the others may be a string or a function.
    # Forward mode vmaps f, so there (as in jax.jacfwd) aux must be arrays; reverse mode (which
    # auto picks here: 2 inputs, 2 outputs) passes any aux through.
    def f(x, label, *, activation):
        return activation(x) * 2.0, (jnp.sum(x) if mode == "forward" else f"{label}: aux")

    x = jnp.asarray([0.5, 1.0])
    jac, aux = jacobian(f, mode=mode, has_aux=True)(x, "tanh", activation=jnp.tanh)
    np.testing.assert_allclose(np.asarray(jac), np.diag(2.0 / np.cosh([0.5, 1.0]) ** 2), rtol=1e-6)
    assert aux == (1.5 if mode == "forward" else "tanh: aux")


def test_half_precision_inputs_are_accepted_and_keep_their_dtype():
    def f(x):
        return jnp.sum(x**3)

    for dtype in (jnp.float16, jnp.bfloat16):
        x = jnp.asarray([1.0, 2.0], dtype)
        v = jnp.asarray([1.0, -1.0], dtype)
        results = {
            "jacobian": jacobian(lambda x: x**2)(x),
            "hessian": hessian(f)(x),
            "hvp": hvp(f, x, v),
            "hvp with a Python scalar": hvp(lambda x: x**3, x[0], 2),
            "jvp": jvp(lambda x: x**2, x, v),
            "vjp": vjp(lambda x: x**2, x, v),
        }
        expected = {
            "jacobian": np.diag([2.0, 4.0]),
            "hessian": np.diag([6.0, 12.0]),
            "hvp": [6.0, -12.0],
            "hvp with a Python scalar": 12.0,
            "jvp": [2.0, -4.0],
            "vjp": [2.0, -4.0],
        }
        for name, value in results.items():
            assert value.dtype == dtype, (name, dtype)
            np.testing.assert_array_equal(np.asarray(value, np.float32), expected[name])


def test_arguments_without_arrays_give_leafless_derivatives():
    def f(params):
        return {"a": jnp.ones(2), "b": 3.0}

    for mode in ("auto", "forward", "reverse"):
        assert jacobian(f, mode=mode)({}) == {"a": {}, "b": {}}
    assert jax.jit(jacobian(f))({}) == {"a": {}, "b": {}}
    assert hessian(lambda p: jnp.sum(jnp.ones(2)))({}) == {}
    jac, aux = jacobian(lambda p, q: (jnp.ones(2), 7.0), argnums=(0, 1), has_aux=True)({}, [])
    assert jac == ({}, []) and aux == 7.0
    assert jvp(lambda p: jnp.ones(2), {}, {}).shape == (2,)
    assert vjp(lambda p: jnp.ones(2), {}, jnp.ones(2)) == {}
    assert hvp(lambda p: jnp.float32(1.0), {}, {}) == {}


def test_numpy_integer_argnums_and_complex_scalars_for_real_inputs():
    # np.int64 positions are ints (jax's own transforms take them).
    jac = jacobian(lambda a: 2.0 * a, argnums=np.int64(0))(jnp.ones(2))
    np.testing.assert_allclose(jac, 2.0 * np.eye(2))
    jac = jacobian(lambda a, b: a * b, argnums=(np.int32(0), 1))(jnp.ones(2), jnp.ones(2))
    assert len(jac) == 2
    # A complex Python scalar as the tangent of a real input is a mismatch, named as such
    # (was "float() argument must be ... not 'complex'").
    with pytest.raises(ValueError, match=r"v must match x .* v has complex64\[\]"):
        jvp(lambda a: a**2, 2.0, 1j)
    assert float(jvp(lambda a: a**2, 2.0, 1.0)) == 4.0


def test_jacobian_of_a_holomorphic_function_of_complex_inputs():
    # Complex inputs were accepted but jax's advice ("pass holomorphic=True") had no way in.
    z = jnp.array([1.0 + 2.0j, -0.5j])
    for mode in ("forward", "reverse", "auto"):
        jac = jacobian(lambda a: a**2, mode=mode, holomorphic=True)(z)
        np.testing.assert_allclose(jac, np.diag(2.0 * np.asarray(z)), rtol=1e-6)
