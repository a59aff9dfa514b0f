"""Automatic differentiation, worked by hand and by JAX: the course's examples, runnable.

    python -m llm_jax.autodiff [sigmoid|hidden|perceptron|compose|all]

Each demonstration is a function that returns its numbers (the tests check them) and a `show_*`
function that prints them with a short explanation:
- `sigmoid_neuron`: one neuron's gradients three ways: the chain rule written out, central
  finite differences, and `jax.grad`;
- `hidden_layer`: backpropagation through a one-hidden-layer network in matrix form (deltas and
  outer products) against `jax.grad`, then one gradient-descent step;
- `film_perceptron` / `learn_film`: a perceptron's hand-set decision, then the same decision
  learned from examples by a logistic neuron trained with `jax.grad`;
- `compose`: transformations compose: the grad of a grad, `jacfwd` vs `jacrev`, and per-example
  gradients with `vmap(grad(...))`.

Everything computes in float64 (JAX's x64 mode, switched on only inside these functions), so the
different routes to one gradient agree to about 1e-10 rather than float32's 1e-4.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.cli import run_main
from llm_jax.errors import UserError


def _sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def _bce(p, y):
    """Binary cross-entropy of a predicted probability p for a target y in [0, 1]."""
    return -(y * jnp.log(p) + (1.0 - y) * jnp.log(1.0 - p))


# --- One sigmoid neuron -------------------------------------------------------------------------


def sigmoid_neuron(w: float = 0.6, b: float = -0.3, x: float = 2.0, y: float = 1.0,
                   eps: float = 1e-6) -> dict:
    """L(w, b) = BCE(sigmoid(w x + b), y): dL/dw and dL/db by hand, numerically, by jax.grad."""
    with jax.enable_x64(True):
        def loss(w, b):
            return _bce(_sigmoid(w * x + b), y)

        z = w * x + b
        p = 1.0 / (1.0 + math.exp(-z))
        dL_dp = -y / p + (1.0 - y) / (1.0 - p)
        dp_dz = p * (1.0 - p)  # the sigmoid's derivative, written with its own output
        dz_dw, dz_db = x, 1.0
        auto = jax.grad(loss, argnums=(0, 1))(jnp.float64(w), jnp.float64(b))
        return {
            "w": w, "b": b, "x": x, "y": y, "z": z, "p": p, "loss": float(loss(w, b)),
            "dL_dp": dL_dp, "dp_dz": dp_dz, "dz_dw": dz_dw, "dz_db": dz_db,
            "chain_rule": (dL_dp * dp_dz * dz_dw, dL_dp * dp_dz * dz_db),
            "simplified": ((p - y) * x, p - y),  # dL/dp * dp/dz collapses to p - y
            "finite_diff": (float(loss(w + eps, b) - loss(w - eps, b)) / (2 * eps),
                            float(loss(w, b + eps) - loss(w, b - eps)) / (2 * eps)),
            "autodiff": tuple(float(g) for g in auto),
        }


def show_sigmoid(r: dict) -> None:
    print("A sigmoid neuron: p = sigmoid(w*x + b), loss = -[y log p + (1-y) log(1-p)]")
    print(f"  w={r['w']}, b={r['b']}, x={r['x']}, target y={r['y']}")
    print(f"  forward:  z = w*x + b = {r['z']:.6f}, p = sigmoid(z) = {r['p']:.6f}, "
          f"loss = {r['loss']:.6f}")
    print("  chain rule: dL/dw = dL/dp * dp/dz * dz/dw")
    print(f"    dL/dp = -y/p + (1-y)/(1-p) = {r['dL_dp']:.6f}")
    print(f"    dp/dz = p (1-p)            = {r['dp_dz']:.6f}")
    print(f"    dz/dw = x = {r['dz_dw']},  dz/db = 1")
    print("    the product simplifies: dL/dz = p - y, so dL/dw = (p - y) x and dL/db = p - y")
    print(f"  {'':24s}{'dL/dw':>18s}{'dL/db':>18s}")
    for name, key in (("chain rule, by hand", "chain_rule"), ("(p - y) * x, (p - y)", "simplified"),
                      ("central differences", "finite_diff"), ("jax.grad", "autodiff")):
        gw, gb = r[key]
        print(f"  {name:24s}{gw:18.13f}{gb:18.13f}")
    print(f"  largest relative difference from jax.grad: {relative_spread(r):.1e} (float64)")


def relative_spread(r: dict) -> float:
    """The largest relative difference between jax.grad and the other three routes."""
    auto = np.array(r["autodiff"])
    return max(float(np.max(np.abs(np.array(r[k]) - auto) / np.abs(auto)))
               for k in ("chain_rule", "simplified", "finite_diff"))


# --- A hidden layer -----------------------------------------------------------------------------


def hidden_layer(lr: float = 1.0, seed: int = 0) -> dict:
    """A 3-4-1 sigmoid network on XOR's 4 examples: backprop by hand vs jax.grad, one step.

    Forward: H = sigmoid(X W1 + b1) (N, 4); P = sigmoid(H W2 + b2) (N, 1); L = mean BCE.
    Backward: delta2 = (P - Y) / N; dW2 = H^T delta2; delta1 = (delta2 W2^T) * H (1 - H);
    dW1 = X^T delta1. X^T delta1 is the sum over examples of the outer products x_n delta1_n.
    """
    rng = np.random.default_rng(seed)
    X = np.array([[0.0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]])  # third input: a constant 1
    Y = np.array([[0.0], [1.0], [1.0], [0.0]])  # XOR of the first two: needs the hidden layer
    params = {"W1": rng.normal(0, 1, (3, 4)), "b1": np.zeros(4),
              "W2": rng.normal(0, 1, (4, 1)), "b2": np.zeros(1)}
    with jax.enable_x64(True):
        def loss(p):
            H = _sigmoid(X @ p["W1"] + p["b1"])
            P = _sigmoid(H @ p["W2"] + p["b2"])
            return jnp.mean(_bce(P, Y))

        H = 1.0 / (1.0 + np.exp(-(X @ params["W1"] + params["b1"])))
        P = 1.0 / (1.0 + np.exp(-(H @ params["W2"] + params["b2"])))
        delta2 = (P - Y) / len(X)  # dL/dz2 (N, 1): p - y again, over N for the mean
        delta1 = (delta2 @ params["W2"].T) * H * (1.0 - H)  # dL/dz1 (N, 4)
        by_hand = {"W1": X.T @ delta1, "b1": delta1.sum(0), "W2": H.T @ delta2,
                   "b2": delta2.sum(0)}
        autodiff = jax.tree.map(np.asarray, jax.grad(loss)(params))
        stepped = {k: params[k] - lr * by_hand[k] for k in params}
        return {"X": X, "Y": Y, "P": P, "delta2": delta2, "delta1": delta1, "by_hand": by_hand,
                "autodiff": autodiff, "lr": lr, "loss": float(loss(params)),
                "loss_after": float(loss(stepped)),
                "max_abs_diff": max(float(np.max(np.abs(by_hand[k] - autodiff[k])))
                                    for k in params)}


def show_hidden(r: dict) -> None:
    print("A hidden layer: H = sigmoid(X W1 + b1), P = sigmoid(H W2 + b2), loss = mean BCE")
    print(f"  X (4 examples x 3 inputs) =\n{r['X']}\n  targets Y = {r['Y'].ravel()}, "
          f"predictions P = {r['P'].ravel()}, loss = {r['loss']:.6f}")
    print("  backward in matrix form:")
    print(f"    delta2 = (P - Y) / N                = {r['delta2'].ravel()}")
    print(f"    dW2 = H^T delta2                    = {r['by_hand']['W2'].ravel()}")
    print("    delta1 = (delta2 W2^T) * H (1 - H)   (N, 4)")
    print("    dW1 = X^T delta1, a sum of outer products x_n delta1_n over the examples:")
    print(f"{r['by_hand']['W1']}")
    print(f"  jax.grad gives dW1 =\n{r['autodiff']['W1']}")
    print(f"  largest difference, hand vs jax.grad, over W1 b1 W2 b2: {r['max_abs_diff']:.2e}")
    print(f"  one gradient-descent step, params -= {r['lr']} * grad: "
          f"loss {r['loss']:.6f} -> {r['loss_after']:.6f}")


# --- The perceptron that decides whether to see a film ------------------------------------------

FILM_INPUTS = ("weather is good", "the ticket is cheap", "a friend comes along")
FILM_WEIGHTS = (8.0, 4.0, 4.0)
FILM_THRESHOLD = 8.0


def film_perceptron(x, weights=FILM_WEIGHTS, threshold=FILM_THRESHOLD):
    """The step rule: go (1) when the weighted sum of the inputs reaches the threshold."""
    return (jnp.asarray(x) @ jnp.asarray(weights) >= threshold).astype(jnp.int32)


def film_truth_table() -> list[tuple[int, int, int, float, int]]:
    """(weather, price, company, weighted sum, decision) for all 8 inputs."""
    rows = []
    for bits in np.ndindex(2, 2, 2):
        total = float(np.dot(bits, FILM_WEIGHTS))
        rows.append((*bits, total, int(film_perceptron(np.array(bits, np.float32)))))
    return rows


def learn_film(n: int = 256, steps: int = 3000, lr: float = 1.0, seed: int = 0) -> dict:
    """Learn the film decision from n random examples: a logistic neuron, plain gradient descent."""
    X = np.random.default_rng(seed).integers(0, 2, size=(n, 3)).astype(np.float64)
    y = np.asarray(film_perceptron(X))
    with jax.enable_x64(True):
        def loss(p, X, y):
            return jnp.mean(_bce(_sigmoid(X @ p["w"] + p["b"]), y))

        @jax.jit
        def descend(p):
            def step(_, p):
                grads = jax.grad(loss)(p, X, y)
                return jax.tree.map(lambda a, g: a - lr * g, p, grads)
            return jax.lax.fori_loop(0, steps, step, p)

        p0 = {"w": jnp.zeros(3), "b": jnp.zeros(())}
        p = descend(p0)
        every = np.array([row[:3] for row in film_truth_table()], np.float64)
        want = np.array([row[4] for row in film_truth_table()])
        learned = np.asarray(_sigmoid(every @ p["w"] + p["b"]) >= 0.5).astype(int)
        train_pred = np.asarray(_sigmoid(X @ p["w"] + p["b"]) >= 0.5).astype(int)
        w, b = np.asarray(p["w"]), float(p["b"])
        return {"n": n, "steps": steps, "lr": lr, "w": w, "b": b,
                "w_scaled": w * FILM_THRESHOLD / -b,  # the same rule with threshold 8
                "loss_before": float(loss(p0, X, y)), "loss_after": float(loss(p, X, y)),
                "accuracy_train": float(np.mean(train_pred == y)),
                "accuracy_rule": float(np.mean(learned == want)), "learned": learned}


def show_perceptron(table: list, r: dict) -> None:
    print("A perceptron deciding whether to see a film: go if "
          f"{FILM_WEIGHTS[0]:g}*weather + {FILM_WEIGHTS[1]:g}*price + {FILM_WEIGHTS[2]:g}*company "
          f">= {FILM_THRESHOLD:g}")
    print("  inputs: " + ", ".join(f"{n} (1/0)" for n in FILM_INPUTS))
    print("  weather price company | sum | go?")
    for wthr, price, company, total, go in table:
        print(f"  {wthr:7d} {price:5d} {company:7d} | {total:3g} | {'yes' if go else 'no'}")
    print("  The step function has no useful gradient (zero almost everywhere), so to learn the")
    print("  rule from examples we swap it for a sigmoid and minimise the cross-entropy with "
          "jax.grad:")
    print(f"  {r['n']} random examples labelled by the rule, {r['steps']} steps of gradient "
          f"descent (lr {r['lr']}):")
    print(f"  loss {r['loss_before']:.4f} -> {r['loss_after']:.4f}")
    w = r["w"]
    print(f"  learned weights {w[0]:.3f} {w[1]:.3f} {w[2]:.3f}, bias {r['b']:.3f}")
    ws = r["w_scaled"]
    print(f"  scaled so that the threshold is {FILM_THRESHOLD:g}: weights {ws[0]:.2f} {ws[1]:.2f} "
          f"{ws[2]:.2f},")
    print(f"  in the ratios {ws[0] / ws[2]:.2f} : {ws[1] / ws[2]:.2f} : 1 (the rule's "
          f"{' '.join(f'{v:g}' for v in FILM_WEIGHTS)}: 2 : 1 : 1)")
    print(f"  accuracy: {100 * r['accuracy_train']:.1f}% on the examples, "
          f"{100 * r['accuracy_rule']:.1f}% on all 8 inputs against the rule")


# --- Composing transformations ------------------------------------------------------------------


def compose(x: float = 0.7, seed: int = 0) -> dict:
    """grad of grad, jacfwd vs jacrev, and per-example gradients with vmap(grad)."""
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        # d2/dx2 tanh(x) = -2 tanh(x) (1 - tanh(x)^2)
        second = float(jax.grad(jax.grad(jnp.tanh))(x))
        closed = -2 * math.tanh(x) * (1 - math.tanh(x) ** 2)

        A = rng.normal(size=(5, 3))

        def f(v):  # R^3 -> R^5
            return jnp.tanh(A @ v) * jnp.sum(v ** 2)

        v = rng.normal(size=3)
        jac_fwd, jac_rev = np.asarray(jax.jacfwd(f)(v)), np.asarray(jax.jacrev(f)(v))

        w = rng.normal(size=3)
        xs, ys = rng.normal(size=(8, 3)), rng.normal(size=8)

        def example_loss(w, x, y):
            return (x @ w - y) ** 2

        per_example = np.asarray(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(w, xs, ys))
        looped = np.stack([np.asarray(jax.grad(example_loss)(w, x, y)) for x, y in zip(xs, ys)])
        mean_grad = np.asarray(jax.grad(lambda w: jnp.mean(jax.vmap(
            example_loss, in_axes=(None, 0, 0))(w, xs, ys)))(w))
        return {"x": x, "second": second, "closed": closed, "jac_fwd": jac_fwd,
                "jac_rev": jac_rev, "per_example": per_example, "looped": looped,
                "mean_grad": mean_grad}


def show_compose(r: dict) -> None:
    print("Composing transformations: each returns an ordinary function, so they stack.")
    print(f"  jax.grad(jax.grad(tanh))({r['x']}) = {r['second']:.12f}")
    print(f"  closed form -2 tanh(x)(1 - tanh(x)^2) = {r['closed']:.12f}")
    m, n = r["jac_fwd"].shape
    print(f"  Jacobian of f: R^{n} -> R^{m}, shape {r['jac_fwd'].shape}; jacfwd and jacrev agree "
          f"to {np.max(np.abs(r['jac_fwd'] - r['jac_rev'])):.1e}:")
    print(r["jac_fwd"])
    print(f"  jacfwd builds it a column at a time ({n} forward-mode JVPs, one per input),")
    print(f"  jacrev a row at a time ({m} reverse-mode VJPs, one per output): jacfwd is cheaper")
    print("  for tall Jacobians (few inputs, many outputs), jacrev for wide ones. A loss has")
    print("  millions of inputs and one output, which is why training uses reverse mode.")
    print(f"  per-example gradients of (x.w - y)^2, jax.vmap(jax.grad(loss)) over "
          f"{len(r['per_example'])} examples:")
    print(r["per_example"])
    print(f"  a Python loop of jax.grad gives the same to "
          f"{np.max(np.abs(r['per_example'] - r['looped'])):.1e}; their mean {r['mean_grad']}")
    print("  is the gradient of the mean loss (what training uses); per-example norms are what")
    print("  clipping for differential privacy needs.")


DEMOS = ("sigmoid", "hidden", "perceptron", "compose")


def main(argv: list[str]) -> None:
    which = argv[0] if argv else "all"
    if len(argv) > 1 or which not in (*DEMOS, "all"):
        raise UserError(f"usage: python -m llm_jax.autodiff [{'|'.join(DEMOS)}|all] "
                        f"(got {' '.join(argv)!r})")
    with np.printoptions(precision=6, suppress=True):
        for i, name in enumerate(DEMOS if which == "all" else (which,)):
            if i:
                print()
            if name == "sigmoid":
                show_sigmoid(sigmoid_neuron())
            elif name == "hidden":
                show_hidden(hidden_layer())
            elif name == "perceptron":
                show_perceptron(film_truth_table(), learn_film())
            else:
                show_compose(compose())


if __name__ == "__main__":
    run_main(main)
