"""Deploying a plan: the plan schema and its YAML, the applier, held weights, the audit and the
training step. Needs torch and pyyaml only (``pip install precsearch``)."""
