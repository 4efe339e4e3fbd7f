"""uoomd: a policy-driven userspace OOM killer."""

__version__ = "0.1.0"
