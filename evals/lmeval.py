"""``python -m dsv41.evals.lmeval ARGS`` = ``lm_eval ARGS`` with the ``dsv41`` model registered and the kit's
task folder added to ``--include_path`` for ``run`` / ``ls`` / ``validate`` (lm-eval 0.4 has no
plugin discovery for models, so something has to import :mod:`dsv41.evals.lm_model` first)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import lm_model  # noqa: F401 - registers --model dsv41
    from .compare import TASKS_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].startswith("-"):
        args.insert(0, "run")  # legacy form `lm_eval --model ...`
    if args and args[0] in ("run", "ls", "validate") and "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
