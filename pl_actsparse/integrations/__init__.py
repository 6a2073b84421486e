"""Integrations with other libraries' mechanisms (accelerate dispatch hooks, peft adapters)."""
