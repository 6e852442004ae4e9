"""specplug: speculative decoding drafters for the embedded engine, vLLM and SGLang."""
__version__ = "0.1.0"
