"""`alignkit run`: a recipe's stages (sft, pref, online, merge, eval, card, push, export) in order,
in one run dir.

`plan` parses and links the stages, `state` fingerprints them (`digest` reads what they
take from disk) and decides what to do, `run` carries them out, `check` validates a dry run, `summary` writes summary.md.
"""

from alignkit.workflow.check import describe, validate
from alignkit.workflow.plan import Workflow, load_workflow
from alignkit.workflow.run import default_run_dir, run_workflow

__all__ = ["Workflow", "default_run_dir", "describe", "load_workflow", "run_workflow", "validate"]
