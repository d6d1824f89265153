"""Test-session settings."""

import jax

# Many tests compare float32 results with NumPy references at rtol 1e-5. On GPUs and TPUs JAX
# multiplies float32 matrices at reduced precision by default (TF32, bfloat16 passes), which
# is ~1e-3 off; run the suite at full float32 precision there. CPUs always compute in full, and
# tests of check_grads' own precision handling expect the default left alone there.
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")
