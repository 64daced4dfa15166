"""PyTorch reference steps of the same CNN and batch (run in a child process, no JAX in it).

:data:`TORCH_STEPS` names them. The multitask references do what LibMTL's
weighting methods do at every step (``LibMTL/weighting/{PCGrad,MGDA,CAGrad}.py``):
``N`` backward passes, one per task loss (``torch.autograd.grad`` with the
graph retained), the task gradients flattened into ``grads [N, P]``, the
method's solver, and the combined gradient written back before the optimizer
step:

* **PCGrad**: each task gradient projected, in a random order of the others,
  off the gradients it conflicts with; the projections summed.
* **MGDA** (LibMTL's default ``mgda_gn='none'``): the min-norm point of the
  task gradients' convex hull by Sener & Koltun's Frank-Wolfe solver on
  ``G = grads grads^T`` (start at the best pair, at most 250 iterations, stop
  when the iterate moves by less than 1e-5 in L1), written as the same
  torch-tensor loop; update ``sum_i c_i g_i``.
* **CAGrad** (``c = 0.5``, LibMTL's default ``rescale=1``): the official
  solver, ``scipy.optimize.minimize`` with bounds and an equality
  constraint (SLSQP) of ``x^T G b + c ||g_0|| sqrt(x^T G x)`` over the
  simplex, on the CPU copy of ``G``; update
  ``(g_0 + c ||g_0|| / ||g_w|| g_w) / (1 + c^2)``. Skipped, and said so,
  without scipy.

With ``torchjd`` importable, PCGrad is also timed through torchjd's Gramian
engine (``autogram.Engine`` over the per-example losses; the task Gram matrix
``M G M^T``; ``PCGradWeighting``; one weighted backward pass).

Run as ``python -m experiments.benchmark.references '<json arguments>'`` by
:func:`experiments.benchmark.run.bench_torch` (``--torch_python`` picks the
interpreter); prints one ``RESULT <json>`` line, ``RESULT null`` without torch.
"""

import json
import statistics
import sys
import time
from typing import Optional

#: label -> what it is.
TORCH_STEPS = {
    "plain": "plain step: one backward pass of the mean loss",
    "pcgrad_loop": "PCGrad as LibMTL computes it: N backward passes (one per task loss), "
                   "projections on the flattened gradients",
    "mgda_loop": "MGDA as LibMTL computes it (mgda_gn='none'): N backward passes, "
                 "Frank-Wolfe min-norm solver on G (<= 250 iterations, torch tensors)",
    "cagrad_loop": "CAGrad as LibMTL computes it (c=0.5, rescale=1): N backward passes, "
                   "scipy SLSQP on G (the official solver)",
    "pcgrad_torchjd": "PCGrad with torchjd's Gramian engine (autogram.Engine over the "
                      "per-example losses, batch_dim=0; task Gram = M G M^T; "
                      "PCGradWeighting; one weighted backward pass)",
}

#: Our method (registry name) compared with each reference.
OURS = {"plain": None, "pcgrad_loop": "pcgrad", "mgda_loop": "mgda", "cagrad_loop": "cagrad",
        "pcgrad_torchjd": "pcgrad"}


def _version(pkg: str) -> Optional[str]:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(pkg)
  except Exception:  # pylint: disable=broad-except
    return None


def min_norm_weights(torch, gram, max_iter: int = 250, stop: float = 1e-5):
  """Sener & Koltun's Frank-Wolfe min-norm solver on a Gram matrix (torch tensors).

  The point of the simplex minimising ``w^T G w``: start from the best
  two-task solution, then move towards the projected-gradient vertex with an
  exact line search, until the iterate moves by less than ``stop`` (L1).
  """
  n = gram.shape[0]

  def line(a, ab, b):
    """min over t in [0, 1] of |t x + (1 - t) y|^2 given x.x, x.y, y.y: (t, cost)."""
    if ab >= a:
      return 0.999, a
    if ab >= b:
      return 0.001, b
    t = (b - ab) / (a + b - 2 * ab)
    return t, b + t * (ab - b)

  best = None
  for i in range(n):
    for j in range(i + 1, n):
      t, cost = line(gram[i, i], gram[i, j], gram[j, j])
      if best is None or cost < best[2]:
        best = (i, j, t, cost)
  w = torch.zeros(n, dtype=gram.dtype)
  if best is None:  # one task
    return torch.ones(n, dtype=gram.dtype)
  i, j, t, _ = best
  w[i], w[j] = t, 1 - t
  if n < 3:
    return w

  def to_simplex(y):
    s, _ = torch.sort(y, descending=True)
    cum = torch.cumsum(s, 0)
    k = torch.arange(1, n + 1, dtype=y.dtype)
    ok = s - (cum - 1) / k > 0
    r = int(torch.nonzero(ok).max())
    return torch.clamp(y - (cum[r] - 1) / (r + 1), min=0)

  def next_point(w, d):
    d = d - d.sum() / n
    neg, pos = d < 0, d > 0
    steps = torch.cat([-w[neg] / d[neg], (1 - w[pos]) / d[pos]])
    steps = steps[steps > 1e-7]
    t = steps.min() if steps.numel() else torch.ones((), dtype=w.dtype)
    return to_simplex(w + t * d)

  for _ in range(max_iter):
    v = next_point(w, -(gram @ w))
    a, ab, b = w @ gram @ w, w @ gram @ v, v @ gram @ v
    t, _ = line(a, ab, b)
    new = t * w + (1 - t) * v
    if torch.sum(torch.abs(new - w)) < stop:
      return w
    w = new
  return w


def cagrad_direction(torch, grads, c: float = 0.5, rescale: int = 1):
  """CAGrad's update from the task gradients ``[N, P]`` with the official SLSQP solver."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  n = grads.shape[0]
  gg = (grads @ grads.T).cpu().double().numpy()
  g0_norm = float(np.sqrt(gg.mean() + 1e-8))
  x0 = np.full(n, 1.0 / n)
  radius = c * g0_norm + 1e-8

  def objective(x):
    return x @ gg @ x0 + radius * np.sqrt(x @ gg @ x + 1e-8)

  res = optimize.minimize(objective, x0, bounds=[(0.0, 1.0)] * n,
                          constraints=({"type": "eq", "fun": lambda x: 1.0 - np.sum(x)},))
  w = torch.as_tensor(res.x, dtype=grads.dtype)
  gw = w @ grads
  g = grads.mean(0) + radius / (gw.norm() + 1e-8) * gw
  return g / {0: 1.0, 1: 1.0 + c ** 2, 2: 1.0 + c}[rescale]


def torch_step(arch: dict, n: int, per_task: int, rounds: int, k: int,
               steps: Optional[list[str]] = None) -> Optional[dict]:
  """Times the PyTorch steps of :data:`TORCH_STEPS` (all, or ``steps``) on the CNN ``arch``.

  Same architecture (``experiments.benchmark.workloads.cnn_architecture``),
  batch (``n`` tasks x ``per_task`` examples, task ``i`` owning examples
  ``[i * per_task, (i + 1) * per_task)``), loss and SGD + Nesterov as the JAX
  steps. Rounds are interleaved across the steps. None without torch.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn as tnn  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  wanted = list(TORCH_STEPS) if steps is None else list(steps)

  def build():
    """(per-example losses function, layers, parameters, optimizer): one copy
    per step, since torchjd's engine hooks its modules for good."""
    layers, ch = [], 3
    for _ in range(arch["num_conv"]):
      layers += [tnn.Conv2d(ch, arch["features"], 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2)]
      ch = arch["features"]
    head, width = [], ch
    for _ in range(arch["mlp_layers"]):
      head += [tnn.Linear(width, arch["mlp_width"]), tnn.ReLU()]
      width = arch["mlp_width"]
    head.append(tnn.Linear(width, arch["num_classes"]))
    conv, mlp = tnn.Sequential(*layers), tnn.Sequential(*head)
    params = list(conv.parameters()) + list(mlp.parameters())
    per_example_losses = lambda: tnn.functional.cross_entropy(
        mlp(conv(x).mean(dim=(2, 3))), y, reduction="none")
    return (per_example_losses, list(conv) + list(mlp), params,
            torch.optim.SGD(params, lr=0.025, momentum=0.9, nesterov=True))

  b = n * per_task
  x = torch.randn(b, 3, 32, 32)
  y = torch.randint(0, arch["num_classes"], (b,))
  avg = torch.zeros(n, b)  # M: task losses = M @ per-example losses
  for i in range(n):
    avg[i, i * per_task:(i + 1) * per_task] = 1.0 / per_task

  def task_grads(task_losses, params):
    """``[N, P]``: one backward pass per task loss (LibMTL's ``_compute_grad``)."""
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        task_losses[i], params, retain_graph=i < n - 1)]) for i in range(n)])

  def write_grad(params, flat):
    offset = 0
    for p in params:
      p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
      offset += p.numel()

  def make_plain():
    per_example_losses, _, _, opt = build()

    def plain():
      opt.zero_grad(set_to_none=True)
      per_example_losses().mean().backward()
      opt.step()
    return plain

  def make_loop(combine):
    per_example_losses, _, params, opt = build()

    def loop():
      opt.zero_grad(set_to_none=True)
      grads = task_grads(avg @ per_example_losses(), params)
      write_grad(params, combine(grads))
      opt.step()
    return loop

  def pcgrad(grads):
    projected = grads.clone()
    for i in range(n):
      for j in torch.randperm(n).tolist():
        dot = projected[i] @ grads[j]
        if dot < 0:
          projected[i] -= dot / (grads[j] @ grads[j]) * grads[j]
    return projected.sum(dim=0)  # LibMTL and torchjd sum the projected gradients

  def mgda(grads):
    return min_norm_weights(torch, grads @ grads.T) @ grads

  makers = {"plain": make_plain, "pcgrad_loop": lambda: make_loop(pcgrad),
            "mgda_loop": lambda: make_loop(mgda),
            "cagrad_loop": lambda: make_loop(lambda g: cagrad_direction(torch, g))}
  fns, skipped = {}, {}
  for name in wanted:
    if name == "cagrad_loop":
      try:
        import scipy.optimize  # pylint: disable=g-import-not-at-top,unused-import
      except ImportError as e:
        skipped[name] = f"scipy not importable (CAGrad's official solver): {e}"
        continue
    if name == "pcgrad_torchjd":
      try:
        from torchjd import aggregation as tjd_agg  # pylint: disable=g-import-not-at-top
        from torchjd import autogram as tjd_autogram  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        skipped[name] = f"torchjd not importable: {e}"
        continue
      per_example_losses, layers, _, opt = build()
      leaves = [m for m in layers if any(True for _ in m.parameters(recurse=False))]
      engine = tjd_autogram.Engine(*leaves, batch_dim=0)
      weighting = tjd_agg.PCGradWeighting()

      def pcgrad_torchjd(per_example_losses=per_example_losses, opt=opt, engine=engine,
                         weighting=weighting):
        opt.zero_grad(set_to_none=True)
        per_example = per_example_losses()
        gram = avg @ engine.compute_gramian(per_example) @ avg.T  # [n, n] task Gram
        (avg @ per_example).backward(weighting(gram))
        opt.step()
      fns[name] = pcgrad_torchjd
      continue
    fns[name] = makers[name]()

  for fn in fns.values():
    for _ in range(2):
      fn()
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(k):
        fn()
      times[name].append((time.perf_counter() - t0) / k)
  return {"torch": torch.__version__, "torchjd": _version("torchjd") if "pcgrad_torchjd" in fns
          else None, "scipy": _version("scipy") if "cagrad_loop" in fns else None,
          "threads": torch.get_num_threads(), "arch": arch, "examples": b, "tasks": n,
          "steps": {name: {"step_ms": 1e3 * statistics.median(ts), "what": TORCH_STEPS[name],
                           "runs_ms": [1e3 * t for t in ts]} for name, ts in times.items()},
          "skipped": skipped}


if __name__ == "__main__":
  kwargs = json.loads(sys.argv[1])
  print("RESULT " + json.dumps(torch_step(**kwargs)), flush=True)
