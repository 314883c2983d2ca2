"""The search: ``tune`` (the fastest variant within a budget), its trials, journal and executors,
and mixed precision to a budget (``quantize --budget``)."""
