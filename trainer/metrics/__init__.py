"""Sample-quality metrics of generated images, as `python -m launch.evaluate` reports them.

- `frechet`: Gaussian statistics (accumulated chunk by chunk) and the Fréchet distance: FID, sFID.
- `inception`: the standard FID Inception (torch-fidelity's TF-faithful port, local weights only)
  with the pool_3 features, the logits behind the Inception Score and sFID's `mixed_6/conv` tap.
- `images`: sample and reference sets (ADM `.npz`, image folders, DiTill shards) read in chunks.
- `reference`: ADM reference batches (precomputed `mu`/`sigma`, `mu_s`/`sigma_s`) or stats computed here.
- `manifold`: Inception Score and precision/recall (Kynkäänniemi et al., k = 3, as ADM's evaluator).
- `clip`: CLIP score with local open_clip weights; `teacher`: student-vs-teacher fidelity.
- `evaluator`: one pass over every input, every metric, the JSON and the table.
"""
