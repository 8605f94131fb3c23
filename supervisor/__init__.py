"""fleetd: plan, generate and supervise LLM serving containers on GPU hosts."""

__version__ = "0.1.0"
