"""dsv41.evals: quality and cost comparison of two models on lm-evaluation-harness.

Modules (imported on demand; none is imported here so that the CLI stays fast):

* ``efficiency`` — analytic params / FLOPs per token / KV-cache bytes (``dsv41 efficiency``);
  ``configs`` — built-in configs (our release, DeepSeek-V4-Flash/-Pro, Llama 3 / 3.1 70B);
  ``measure`` — measured tokens/s and peak memory per model (one subprocess each).
* ``reasoning`` + ``tasks/reasoning/*.yaml`` — the reasoning suite as lm-eval tasks reading local
  upstream files (``data_dir``) or the Hub; ``MissingDataError`` names the task and paths.
* ``lm_model`` — the ``dsv41`` lm-eval model (HFLM with ``moe_backend`` / ``quantization``);
  ``lmeval`` — lm-eval's CLI with that model registered.
* ``compare`` — ``dsv41 compare``: JSON / Markdown / PNG report, paired tests, published baselines
  (``published``) kept apart from measured numbers.
"""
