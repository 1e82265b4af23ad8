"""Streaming extraction engine: ``run`` drives ``input`` -> ``models`` -> ``device`` -> ``storage``.

The run modules here (``run``, ``plan``, ``cluster``, ``telemetry``, ``progress``, ``interrupts``) hold one
run's lifecycle; the folders hold the data flow in order: cells read and tokenized ahead (``input``), the
model families (``models``), micro-batches and the device loop (``device``), and the store (``storage``).
"""
