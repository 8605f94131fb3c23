"""The model runtimes fleetd knows, and the facts about each that other modules share."""

from __future__ import annotations

from enum import StrEnum


class Runtime(StrEnum):
    OLLAMA = "ollama"
    VLLM = "vllm"
    LLAMACPP = "llamacpp"
    GENERIC = "generic"
